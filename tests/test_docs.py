"""docs/methods.md stays true: every "docs/methods.md, section N" pointer in the code names a section that
exists, and the defaults its tables quote are the code's defaults."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from lrkit.fed import flower, simulate
from lrkit.methods import prepare
from lrkit.optim import AdaLomo, Lomo
from lrkit.optim.galore import GaLoreAdamW

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "methods.md").read_text()
SECTIONS = {int(n): title for n, title in re.findall(r"^## (\d+)\. (.+)$", DOC, flags=re.M)}


def section(n: int) -> str:
    start = DOC.index(f"## {n}. ")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end != -1 else None]


def test_every_pointer_names_an_existing_section():
    pointers = []
    for path in [*ROOT.glob("lrkit/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("notebooks/**/*.md"),
                 ROOT / "README.md"]:
        for n in re.findall(r"docs/methods\.md,? section (\d+)", path.read_text()):
            pointers.append((path.relative_to(ROOT), int(n)))
    assert pointers, "no file points to docs/methods.md"
    missing = [(str(p), n) for p, n in pointers if n not in SECTIONS]
    assert not missing, f"pointers to sections that docs/methods.md lacks: {missing} (it has {SECTIONS})"


def _default(source, name):
    if isinstance(source, dict):
        return source[name]
    return inspect.signature(source).parameters[name].default


# (section, where the default lives, parameter, column of the table, how the table writes it)
QUOTED = [
    (1, GaLoreAdamW, "lr", 1, "1e-3"), (1, GaLoreAdamW, "betas", 1, "(0.9, 0.999)"),
    (1, GaLoreAdamW, "eps", 1, "1e-6"), (1, GaLoreAdamW, "correct_bias", 1, "True"),
    (1, GaLoreAdamW, "update_proj_gap", 1, "200"), (1, GaLoreAdamW, "scale", 1, "1.0"),
    (1, prepare, "scale", 1, "0.25"), (1, GaLoreAdamW, "proj_type", 1, '"std"'),
    (1, GaLoreAdamW, "proj_method", 1, '"svd"'), (1, GaLoreAdamW, "switch_subspace", 1, "True"),
    (1, GaLoreAdamW, "moments_on_switch", 1, '"keep"'), (1, GaLoreAdamW, "power_iters", 1, "2"),
    (1, GaLoreAdamW, "pca_lr", 1, "0.1"), (1, GaLoreAdamW, "seed", 1, "0"),
    (2, AdaLomo, "lr", 1, "1e-3"), (2, AdaLomo, "eps", 1, "(1e-30, 1e-3)"),
    (2, AdaLomo, "clip_threshold", 1, "1.0"), (2, AdaLomo, "decay_rate", 1, "-0.8"),
    (2, AdaLomo, "weight_decay", 1, "0.0"), (2, AdaLomo, "fused", 1, "True"),
    (2, AdaLomo, "normalization", 1, '"grouped"'), (2, AdaLomo, "second_moment", 1, '"nmf"'),
    (2, AdaLomo, "factor_rank", 1, "1"), (2, AdaLomo, "nmf_iters", 1, "3"), (2, AdaLomo, "seed", 1, "0"),
    (2, AdaLomo, "reduction", 1, '"auto"'), (2, Lomo, "lr", None, "1e-3"),
    (3, simulate.run_fedlrt, "lr", 1, "0.1"), (3, simulate.run_fedlrt, "local_steps", 1, "1"),
    (3, simulate.run_fedlrt, "variance_correction", 1, '"full"'), (3, simulate.run_fedlrt, "dynamic_rank", 1, "True"),
    (3, simulate.run_fedlrt, "tau", 1, "0.1"), (3, simulate.run_fedlrt, "optimizer", 1, '"sgd"'),
    (3, simulate.run_fedlrt, "client_fraction", 1, "1.0"), (3, simulate.run_fedlrt, "weighted", 1, "False"),
    (3, flower.DEFAULTS, "lr", 2, "0.05"), (3, flower.DEFAULTS, "local_steps", 2, "5"),
    (3, flower.DEFAULTS, "tau", 2, "0.01"), (3, flower.DEFAULTS, "initial_rank", 2, "2"),
    (3, flower.DEFAULTS, "variance_correction", 2, '"full"'),
]


@pytest.mark.parametrize("n,source,name,column,text", QUOTED,
                         ids=[f"{n}-{getattr(s, '__name__', 'DEFAULTS')}-{p}" for n, s, p, _, _ in QUOTED])
def test_quoted_defaults_are_the_code_defaults(n, source, name, column, text):
    assert _default(source, name) == ast.literal_eval(text), f"the code's default of {name} is not {text}"
    body = section(n)
    if column is None:  # quoted in prose, next to the name
        assert re.search(rf"`{name}` \({re.escape(text)}\)", body), f"section {n} does not quote {name} ({text})"
        return
    rows = [r.split("|")[1:-1] for r in body.splitlines() if r.startswith("|") and f"`{name}`" in r.split("|")[1]]
    assert rows, f"section {n} has no table row for `{name}`"
    assert text in rows[0][column], f"section {n} quotes {rows[0][column].strip()!r} for `{name}`, the code has {text}"
