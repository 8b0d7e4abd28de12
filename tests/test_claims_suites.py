"""Every claim the suites define, as their notebooks build them (smoke defaults and the cpu configs), keeps the
kit's conventions (issue 19): higher-is-better metrics say so (the failed-runs rule counts a failed run at the
worst value, so a wrong direction would charge it the best), equivalence wording is an equivalence test with a
stated margin, non-inferiority states its margin, and byte / FLOP counts are accounting, not reproduced claims."""
import ast
import importlib
import json
import re
from pathlib import Path

import pytest

from lrkit.claims import Claim

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("galore", "galore_ablations", "adalomo", "fedlrt", "getting_started", "scaling")
BUILDER_CALL = re.compile(r"suite\.(\w+_claims)\(([^)]*)\)")
SUITE_IMPORT = re.compile(r"experiments import (\w+) as suite")

HIGHER_IS_BETTER = re.compile(r"acc|f1|score", re.I)
# "at least as good as" is non-inferiority, not equivalence: taken out before the equivalence words are looked for
NON_INFERIORITY = re.compile(r"no worse|not worse|at least as (good|well)|non-inferior", re.I)
EQUIVALENCE = re.compile(r"on par|\bties?\b|\btied\b|\bmatch(es|ed)?\b|\bnear(ly)?\b|\balike\b|as good as|"
                         r"does not depend|\bequally\b", re.I)


def _claims_of(value):
    if isinstance(value, Claim):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _claims_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _claims_of(v)


def _parameters(nb: Path, profile: str) -> dict:
    """The notebook's parameters at ``profile``: its defaults (literal ones), with the config layers over them."""
    import papermill

    from lrkit import reports

    params = {}
    for name, spec in papermill.inspect_notebook(str(nb)).items():
        try:
            params[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            pass
    return params | (reports.notebook_parameters(nb, profile) if profile != "smoke" else {})


def _built(profile: str):
    """(where, claim) for every claim a builder makes in a notebook, called with that notebook's arguments."""
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        src = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        suite = SUITE_IMPORT.search(src)
        for name, args in BUILDER_CALL.findall(src):
            if suite is None:
                continue
            module = importlib.import_module(f"lrkit.experiments.{suite.group(1)}")
            params, call = _parameters(nb, profile), []
            for arg in filter(None, (a.strip() for a in args.split(","))):
                if arg not in params:  # computed in the notebook: the builder's default from here on
                    break
                call.append(params[arg])
            for c in getattr(module, name)(*call):
                yield f"{nb.relative_to(ROOT)}:{name}({args}) at {profile}", c


def all_claims():
    out = []
    for suite in SUITES:
        module = importlib.import_module(f"lrkit.experiments.{suite}")
        for attr in dir(module):
            if attr.startswith("CLAIMS") or attr.endswith("_CLAIMS"):
                out += [(f"{suite}.{attr}", c) for c in _claims_of(getattr(module, attr))]
    for profile in ("smoke", "cpu"):
        out += list(_built(profile))
    return out


@pytest.fixture(scope="module")
def claims():
    found = all_claims()
    assert len(found) > 20, f"only {len(found)} claims found: the walk over the suites is broken"
    return found


def test_higher_is_better_metrics_say_so(claims):
    bad = sorted({f"{c.id} ({c.metric}) in {where}" for where, c in claims
                  if HIGHER_IS_BETTER.search(c.metric) and c.lower_is_better})
    assert not bad, f"accuracy / F1 / score claims with lower_is_better=True: {bad}"


def test_every_equivalence_claim_is_two_sided_with_a_margin(claims):
    bad = sorted({f"{c.id} in {where}" for where, c in claims if c.op == "between" and not c.margin_reason.strip()})
    assert not bad, f"'between' claims without margin_reason: {bad}"
    words = sorted({f"{c.id} (op {c.op!r}) in {where}" for where, c in claims if not c.accounting
                    and EQUIVALENCE.search(NON_INFERIORITY.sub("", f"{c.id.replace('-', ' ')} {c.statement}"))
                    and c.op != "between"})
    assert not words, f"claims worded as equivalence (on par, tie, matches, near, ...) that are not op='between': {words}"


def test_non_inferiority_claims_state_their_margin(claims):
    bad = sorted({f"{c.id} in {where}" for where, c in claims
                  if NON_INFERIORITY.search(c.statement) and c.op != "between" and not c.margin_reason.strip()})
    assert not bad, f"'no worse than' claims without margin_reason: {bad}"


def test_byte_and_flop_counts_are_accounting(claims):
    bad = sorted({f"{c.id} ({c.metric}) in {where}" for where, c in claims
                  if (c.metric.endswith("_bytes") or "flops" in c.metric.lower()) and not c.accounting})
    assert not bad, f"claims on byte / FLOP counts not marked accounting=True: {bad}"


def test_the_checks_catch_what_they_look_for():
    # the patterns themselves: a plausible slip of each kind is caught, honest wording is not
    assert HIGHER_IS_BETTER.search("accuracy_tail") and HIGHER_IS_BETTER.search("macro_f1")
    assert EQUIVALENCE.search("galore lora tie r16") and EQUIVALENCE.search("AdaLomo is on par with AdamW")
    assert not EQUIVALENCE.search(NON_INFERIORITY.sub("", "GaLore is at least as good as LoRA"))
    assert not EQUIVALENCE.search("the linear layers' entities") and NON_INFERIORITY.search("no worse than AdamW")
