"""The papermill -> report pipe: run a notebook for a profile, export it, index the results, and diff
a fresh run against the committed reference.

    python -m lrkit.reports run notebooks/getting_started.ipynb --profile cpu
    python -m lrkit.reports run notebooks/*/*.ipynb --profile cpu --if-stale   # skip up-to-date results
    python -m lrkit.reports index --profile cpu      # reports/index.html
    python -m lrkit.reports readme                   # reports/README.md: the papers' numbers beside the kit's
                                                     # (every profile but smoke), then the cpu reference results
    python -m lrkit.reports check --profile cpu      # fresh run vs the committed metrics.json

A notebook runs into a staging directory that replaces ``reports/<notebook>/<profile>/`` only when the
whole notebook succeeded, so a failed run leaves no half-written results behind (and keeps the last
good ones). After a successful run the runner notes the run's inputs (the notebook's cells, its configs,
the tuned learning rates it read, the lrkit files its kernel imported, the lock) beside the results in
``reports/<notebook>/<profile>/.inputs.json`` (not committed: it says what *this checkout* ran);
``--if-stale`` (what ``make reproduce`` uses) skips a notebook whose results exist and whose inputs are
unchanged, so a rerun after an interruption or a change redoes only what is missing or stale.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import math
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lrkit import records
from lrkit.cli import yaml_value
from lrkit.utils import REPO_ROOT, REPORTS_DIR, atomic_write_bytes, device_info, resolve_device

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
CONFIGS_DIR = REPO_ROOT / "configs"


# The headless kernel's own log: its start-up notice about TCP transport and the "KeyboardInterrupt caught"
# line it logs when papermill shuts it down are noise; a failing cell still raises (papermill) and shows.
KERNEL_QUIET = ["--IPKernelApp.log_level=CRITICAL"]


def profile_settings(profile: str) -> dict:
    """configs/profiles.yaml: per profile its description and notebook cell timeout."""
    spec = yaml.safe_load((CONFIGS_DIR / "profiles.yaml").read_text())
    if profile == "auto":
        profile = "gpu" if resolve_device("auto").type == "cuda" else "cpu"
    if profile not in spec:
        raise ValueError(f"Invalid profile: {profile!r} (expected one of {['auto', *spec]})")
    return {"name": profile, **spec[profile]}


def notebook_key(nb: Path) -> str:
    """notebooks/galore/ablation_rank.ipynb -> 'galore/ablation_rank' (the reports/ and configs/ path)."""
    return nb.resolve().relative_to(NOTEBOOKS_DIR).with_suffix("").as_posix()


def notebook_parameters(nb: Path, profile: str) -> dict:
    """The notebook's parameters at `profile`: smoke = the notebook's own defaults (no file); each larger profile
    layers the notebook's YAMLs (configs/<layer>/<key>.yaml) in records.PROFILES order, cpu then gpu then paper,
    up to `profile`, so a gpu or paper YAML holds only what changes. Every layer's file must exist: a missing one
    is an error naming it, never a silent fallback to a smaller profile. A key that is not a parameter of the
    notebook (or one the runner sets: profile, report_dir) is an error naming the key, and so is a value of
    another kind than the notebook's default (:func:`_check_type`)."""
    import papermill

    if profile not in records.PROFILES:
        raise ValueError(f"Invalid profile: {profile!r} (expected one of {list(records.PROFILES)})")
    layers = records.PROFILES[1:records.PROFILES.index(profile) + 1]
    key = notebook_key(nb)
    known = None
    params = {}
    for layer in layers:
        path = CONFIGS_DIR / layer / f"{key}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"Missing config: {path} ({key} at profile {profile!r} layers "
                                    f"{', '.join(f'configs/{x}/{key}.yaml' for x in layers)}; write the missing file)")
        values = yaml_value(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Invalid config: {path} holds a {type(values).__name__} (expected a mapping "
                             "of notebook parameters to values)")
        if known is None:
            defaults = {k: v["default"] for k, v in papermill.inspect_notebook(str(nb)).items()}
            known = set(defaults) - {"profile", "report_dir"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Invalid key(s) {unknown} in {path}: not parameters of {nb.name} "
                             f"(expected some of {sorted(known)}; profile and report_dir are set by the runner)")
        for name, value in values.items():
            _check_type(name, value, defaults[name], path)
        params |= values
    return params


def _kind(value) -> str | None:
    """A parameter's kind for the YAML type check: None (anything goes), bool, int, float, str, list, dict."""
    if value is None:
        return None
    return "bool" if isinstance(value, bool) else type(value).__name__


def _check_type(name: str, value, default_src: str, path: Path) -> None:
    """A YAML value must have the kind of the notebook's default (an int where a float is expected is fine;
    a list's items are checked against a non-empty default list's items): `steps: "ten"` or `seeds: 3` is an
    error naming the key and the expected kind, not a failure deep inside a cell. Numbers are checked against
    the default's range too (:func:`_check_range`): `lr: .nan`, `steps: -5` and `seeds: []` are errors."""
    import ast

    try:
        default = ast.literal_eval(default_src)
    except (ValueError, SyntaxError):  # an expression: nothing to compare with
        return

    def fits(v, d) -> bool:
        kd, kv = _kind(d), _kind(v)
        return kd is None or kd == kv or (kd == "float" and kv == "int")

    bad = not fits(value, default)
    if not bad and isinstance(default, list) and default and len({_kind(d) for d in default}) == 1:
        bad = not all(fits(v, default[0]) for v in value)
    if bad:
        want = _kind(default) + (f" of {_kind(default[0])}" if isinstance(default, list) and default else "")
        raise ValueError(f"Invalid value for {name!r} in {path}: {value!r} (expected {'an' if want[0] in 'aeiou' else 'a'} {want}, like the notebook's "
                         f"default {default_src})")
    why = _check_range(value, default)
    if why:
        raise ValueError(f"Invalid value for {name!r} in {path}: {value!r} ({why}; the notebook's default is "
                         f"{default_src})")


def _check_range(value, default) -> str:
    """Why ``value`` is out of the range its default implies ("" if fine): numbers finite; a non-negative
    default's value not negative (0 can be meaningful, e.g. ft_train_size 0 = the whole split); a non-empty
    default list's value not empty, and each item checked against the first default item."""
    if isinstance(value, bool) or isinstance(default, bool):
        return ""
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        if not math.isfinite(value):
            return "expected a finite number"
        if default >= 0 and value < 0:
            return "expected a number >= 0"
        return ""
    if isinstance(value, list) and isinstance(default, list) and default:
        if not value:
            return "expected a non-empty list"
        return next((f"item {v!r}: {w}" for v in value if (w := _check_range(v, default[0]))), "")
    return ""


# ------------------------------------------------------------------------------------ stale results
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def notebook_digest(nb: Path) -> str:
    """sha256 of the notebook's cells (type and source), not its outputs: running it in JupyterLab or
    stripping it does not make its results stale; editing a cell does."""
    cells = json.loads(Path(nb).read_text())["cells"]
    return _sha(json.dumps([[c["cell_type"], "".join(c["source"])] for c in cells]).encode())


def run_inputs(nb: Path, profile: str, code: dict | None = None) -> dict:
    """What a notebook's results at ``profile`` depend on: its cells, each config layer it read, the tuned
    learning rates it read (its folder's tuning record), the lrkit files in ``code`` (the kernel's imports,
    :func:`records.loaded_code`; default every lrkit file) hashed as they are now, and the lock."""
    from lrkit._lock import lock_digest

    nb = Path(nb).resolve()
    key = notebook_key(nb)
    layers = records.PROFILES[1:records.PROFILES.index(profile) + 1]
    configs = {f"configs/{x}/{key}.yaml": _sha((CONFIGS_DIR / x / f"{key}.yaml").read_bytes())
               for x in layers if (CONFIGS_DIR / x / f"{key}.yaml").exists()}
    tuned = None
    if (nb.parent / "tuning.ipynb").exists() and nb.stem != "tuning":  # the record experiments.tuned reads
        t = records.tuning_record(Path(key).parent.as_posix(), profile)
        if t is not None:
            tuned = _sha(json.dumps(records.load(t).get("summary", {}).get("tuned"), sort_keys=True).encode())
    files = code if code is not None else {p.relative_to(REPO_ROOT).as_posix(): None
                                            for p in sorted((REPO_ROOT / "lrkit").rglob("*.py"))}
    now = {rel: (_sha((REPO_ROOT / rel).read_bytes()) if (REPO_ROOT / rel).exists() else "deleted")
           for rel in files}
    return {"notebook": notebook_digest(nb), "configs": configs, "tuned": tuned, "code": now,
            "lock": lock_digest()}


def _inputs_path(final: Path) -> Path:
    return final / ".inputs.json"  # swapped in with the results it describes; gitignored (reports/**/.*)


def stale_reason(nb: str | Path, profile: str = "auto") -> str | None:
    """Why ``make reproduce`` must (re)run this notebook at ``profile``, or None when its results are up to
    date: they exist, and this checkout ran them from the same inputs (:func:`run_inputs`) it has now."""
    nb = Path(nb).resolve()
    prof = profile_settings(profile)["name"]
    final = records.report_dir(notebook_key(nb), prof)
    if not (final / "metrics.json").exists():
        return "no results yet"
    if not _inputs_path(final).exists():
        return "results not computed by this checkout (e.g. the committed reference)"
    old = json.loads(_inputs_path(final).read_text())
    new = run_inputs(nb, prof, code=old.get("code", {}))
    changed = [k for k in ("notebook", "configs", "tuned", "lock") if old.get(k) != new[k]]
    changed += [rel for rel, h in old.get("code", {}).items() if new["code"][rel] != h]
    return f"changed since its run: {', '.join(changed)}" if changed else None


def run_notebook(nb: str | Path, profile: str = "auto", overrides: dict | None = None,
                 final: Path | None = None) -> Path:
    """Execute one notebook with papermill at ``profile`` and export it to HTML; returns its report dir.
    ``overrides`` update the profile's parameters and ``final`` replaces the report directory (the
    seed-set check runs a notebook with other seeds beside, not over, the reference)."""
    import papermill

    nb = Path(nb).resolve()
    if not nb.exists() or nb.suffix != ".ipynb":
        raise ValueError(f"Invalid notebook: {nb} (expected an existing .ipynb under notebooks/)")
    prof = profile_settings(profile)
    key = notebook_key(nb)
    default_final = final is None
    final = Path(final) if final is not None else records.report_dir(key, prof["name"])
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{prof['name']}.staging-*"):  # left by a killed run (one run per notebook)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{prof['name']}.staging-"))
    staging.chmod(0o755)
    params = {**notebook_parameters(nb, prof["name"]), **(overrides or {}), "profile": prof["name"],
              "report_dir": str(staging)}
    env_before = os.environ.get("LRKIT_HEADLESS")
    os.environ["LRKIT_HEADLESS"] = "1"  # progress bars off in the headless kernel
    inputs_before = run_inputs(nb, prof["name"])
    t0 = time.perf_counter()
    try:
        print(f"[{key}] profile={prof['name']} params={ {k: v for k, v in params.items() if k != 'report_dir'} }",
              flush=True)
        papermill.execute_notebook(str(nb), str(staging / f"{nb.stem}.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(nb.parent), progress_bar=False,
                                   extra_arguments=KERNEL_QUIET,
                                   execution_timeout=prof["cell_timeout_s"], request_save_on_cell_execute=False)
        wall = time.perf_counter() - t0
        _export_html(staging / f"{nb.stem}.ipynb")
        if not (staging / "metrics.json").exists():
            raise RuntimeError(f"{nb.name} ran but recorded nothing: it must call lrkit.records.save_run")
        records.save_execution(staging, profile=prof["name"], wall_time_s=wall, notebook=f"{nb.stem}.ipynb",
                               html=f"{nb.stem}.html", **device_info(resolve_device("auto")),
                               executed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        # The inputs as the run saw them: cells and configs from before it, the kernel's own hashes of its code.
        code = records.load(staging).get("code") or inputs_before["code"]
        if default_final and not overrides:
            atomic_write_bytes(_inputs_path(staging), json.dumps({**inputs_before, "code": code}, indent=1).encode())
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if env_before is None:
            os.environ.pop("LRKIT_HEADLESS", None)
    print(f"[{key}] done in {wall:.0f} s -> {final}", flush=True)
    return final


# The lab template's two scripts from a CDN (require.js for widgets, MathJax for LaTeX): the notebooks use
# neither, and a page read offline would log a failed load for each. Stripped, the page is self-contained
# (inline CSS, figures as inline PNG).
_CDN_SCRIPT = re.compile(r'<script src="https?://[^"]*">\s*</script>\n?')


def _export_html(executed: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_filename(str(executed))
    atomic_write_bytes(executed.with_suffix(".html"), _CDN_SCRIPT.sub("", body).encode())


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``: two renames, so readers see the old or the new results, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- index
def _collect(profile: str) -> list[tuple[str, Path, dict]]:
    out = []
    for path in sorted(REPORTS_DIR.rglob(f"{profile}/metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(REPORTS_DIR).parts):
            continue
        doc = records.load(path)
        out.append((path.parent.parent.relative_to(REPORTS_DIR).as_posix(), path.parent, doc))
    return out


def _html_table(rows: list[dict], digits: int = 4, verdict_col: str | None = None) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)

    def cell(r, c):
        text = html.escape(_fmt(r.get(c), digits))
        return f'<span class="v {_vclass(str(r.get(c)))}">{text}</span>' if c == verdict_col else text
    body = "".join("<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


ACCOUNTING_TITLE = "Accounting (bookkeeping, not reproduced claims)"


def _claims(doc: dict, accounting: bool | None = None) -> list[dict]:
    """The notebook's recorded verdicts (``lrkit.experiments.report``); only the accounting ones (byte counts,
    analytic FLOPs, formula identities) or only the empirical ones when ``accounting`` is True / False. Records
    made before the accounting field count as empirical."""
    out = doc.get("summary", {}).get("claims", [])
    return out if accounting is None else [c for c in out if bool(c.get("accounting", False)) == accounting]


def _claim_rows(doc: dict, accounting: bool = False) -> list[dict]:
    """The notebook's empirical (or, with ``accounting``, its accounting) verdicts as display rows: verdict,
    estimate, interval, seeds and failed runs, the direction of a comparison, why an unresolved one is
    unresolved, the flags on its inputs and the paper's value with its source. Old records lacking a field show
    it empty."""
    rows = []
    for c in _claims(doc, accounting):
        paper = c.get("paper")
        if paper is not None and c.get("paper_source"):
            paper = f"{_fmt(paper)} ({c['paper_source']})"
        row = {"claim": c["claim"], "verdict": c["verdict"], "estimate": c.get("estimate"), "95% CI": _ci(c),
               "n seeds": c.get("n"),
               "failed runs": f"{c.get('failed', 0)} of {c['runs']}" if c.get("runs") else "",
               "direction": c.get("direction", ""), "why unresolved": c.get("reason", ""),
               "tested": c.get("target", ""), "paper": paper, "source": c.get("source", ""),
               "flags": "; ".join(c.get("flags") or [])}
        rows.append(row)
    return rows


def tally(claims: list[dict]) -> str:
    """The verdict tally of recorded ``claims``: empirical claims only (with the reasons of the unresolved
    ones), then the accounting checks apart, e.g. "empirical claims: 3 contradicted, 20 holds, 17 unresolved
    at this scale (reasons: 9 too few seeds, 5 no effect at this scale, 3 runs failed); accounting: 12 checks,
    all hold"."""
    from collections import Counter

    from lrkit.claims import HOLDS, UNRESOLVED, reason_kind

    empirical = [c for c in claims if not c.get("accounting", False)]
    counts = Counter(c["verdict"] for c in empirical)
    text = "empirical claims: " + (", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "none")
    reasons = Counter(reason_kind(c.get("reason", "")) for c in empirical if c["verdict"] == UNRESOLVED)
    if reasons:
        text += " (reasons: " + ", ".join(f"{n} {k}" for k, n in reasons.most_common()) + ")"
    accounting = Counter(c["verdict"] for c in claims if c.get("accounting", False))
    if accounting:
        total = sum(accounting.values())
        text += f"; accounting: {total} check{'s' if total > 1 else ''}, " + (
            "all hold" if accounting[HOLDS] == total
            else ", ".join(f"{n} {v}" for v, n in sorted(accounting.items())))
    return text


def _ci(c: dict) -> str:
    lo, hi = c.get("low"), c.get("high")
    if lo is None or hi is None or c.get("n", 0) < 2:
        return "none (one seed)"
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _paper_of(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else "kit"


def build_index(profile: str = "auto") -> Path:
    """reports/index.html: a contents list and one section per paper; per notebook a card with every
    claim's verdict, estimate, interval and n at the top, then its headline figure, summary table,
    profile, device and run time, and a link to the executed notebook's HTML."""
    prof = profile_settings(profile)["name"]
    cards, toc, every = {}, [], []
    for key, d, doc in _collect(prof):
        ex, summ = doc.get("execution", {}), doc.get("summary", {})
        rel = d.relative_to(REPORTS_DIR).as_posix()
        anchor = key.replace("/", "-")
        fig = f'<img src="{rel}/{html.escape(summ["headline"])}" alt="{key} headline figure">' \
            if summ.get("headline") else ""
        link = f'<a href="{rel}/{html.escape(ex["html"])}">executed notebook</a>' if ex.get("html") else ""
        rows, accounting = _claim_rows(doc), _claim_rows(doc, accounting=True)
        every += _claims(doc)
        verdicts = "".join(f'<span class="v {_vclass(r["verdict"])}">{html.escape(r["verdict"])}</span> '
                           for r in rows)
        if accounting:
            verdicts += f'<span class="meta">+ {len(accounting)} accounting</span>'
        claims_html = _html_table(rows, verdict_col="verdict") if rows else ""
        if accounting:
            claims_html += (f'<h4>{html.escape(ACCOUNTING_TITLE)}</h4>'
                            + _html_table(accounting, verdict_col="verdict"))
        notes = [c for c in summ.get("conclusions", [])]
        concl = "".join(f"<li>{html.escape(c)}</li>" for c in notes)
        meta = (f"profile <b>{html.escape(prof)}</b> · {html.escape(ex.get('device_name', '?'))} · "
                f"run time {ex.get('wall_time_s', 0):.0f} s · commit {html.escape(_short(doc))}")
        toc.append(f'<li><a href="#{anchor}">{html.escape(key)}</a> {verdicts}</li>')
        cards.setdefault(_paper_of(key), []).append(
            f'<section class="card" id="{anchor}"{" data-headline" if summ.get("headline") else ""}>'
            f'<h3>{html.escape(key)}</h3><p class="meta">{meta}</p>'
            f"{claims_html}{fig}<details><summary>summary table and conclusions</summary>"
            f"<div class=\"scroll\">{_html_table(summ.get('table', []))}</div><ul>{concl}</ul></details>"
            f"<p>{link}</p></section>")
    body = "".join(f'<h2 id="paper-{p}">{html.escape(p)}</h2>{"".join(c)}' for p, c in cards.items())
    if not cards:
        body = f"<p>No results for profile {html.escape(prof)} yet: run <code>make reproduce</code>.</p>"
    counted = html.escape(tally(every)) if every else "none"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lrkit reports ({prof})</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1150px;padding:0 1rem}}
.card{{border:1px solid #ccc;border-radius:8px;padding:1rem;margin:1rem 0}}
.card img{{max-width:100%}} .meta{{color:#555}} .scroll{{overflow-x:auto}}
table{{border-collapse:collapse;margin:.5rem 0;font-size:.85rem;display:block;overflow-x:auto}}
td,th{{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}}
.v{{border-radius:4px;padding:0 .35rem;color:white;font-size:.8rem;white-space:nowrap}}
.holds{{background:#2a9d8f}} .contradicted{{background:#e76f51}} .unresolved{{background:#8d99ae}}</style></head>
<body><h1>lrkit reports: profile {html.escape(prof)}</h1>
<p>Each claim is tested by one rule (<code>lrkit.claims</code>): a paired Student-t 95% interval across seeds;
<b>holds</b> when the whole interval is on the claim's side of the tested bound, <b>contradicted</b> when it is
wholly on the other side, otherwise <b>unresolved at this scale</b>, with its reason. A failed run counts at the
worst value of its metric. Byte counts, analytic FLOPs and formula identities are accounting, shown apart and not
counted as reproduced claims. Verdicts: {counted}.</p>
<nav><ul>{''.join(toc)}</ul></nav>{body}</body></html>"""
    path = REPORTS_DIR / "index.html"
    atomic_write_bytes(path, page.encode())
    print(f"wrote {path} ({len(toc)} notebooks)")
    return path


def _vclass(verdict: str) -> str:
    return verdict.split()[0] if verdict else ""


def _short(doc: dict) -> str:
    commits = {r.get("git_commit", "?") for r in doc.get("runs", {}).values()}
    return ", ".join(c[:10] + ("+dirty" if c.endswith("+dirty") else "") for c in sorted(commits))


def _md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows] + [""])


# The papers the notebook folders reproduce (reports/<folder>/...), in the order the README shows them; a folder
# not named here gets its folder name as title, after these.
PAPER_TITLES = {"galore": "GaLore (Zhao et al., ICML 2024, arXiv 2403.03507)",
                "adalomo": "AdaLomo (Lv et al., Findings of ACL 2024, arXiv 2310.10195)",
                "fedlrt": "FeDLRT (Schotthöfer and Laiu, arXiv 2406.17887)"}
# The profiles whose records stand beside the papers' numbers: every one but smoke (which only checks that the
# code runs, at a scale no verdict means anything at).
COMPARED_PROFILES = tuple(p for p in records.PROFILES if p != "smoke")


def _estimate_text(c: dict) -> str:
    """A recorded verdict's estimate with its 95 % interval and n, e.g. "1.043 [1.012, 1.075], n=5"."""
    if c.get("estimate") is None:
        return "none"
    return f"{_fmt(c['estimate'])} {_ci(c)}, n={c.get('n')}"


def paper_comparison(profiles=COMPARED_PROFILES) -> dict[str, dict]:
    """Per paper folder (``reports/<paper>/<notebook>/<profile>/metrics.json``; the kit's own top-level
    notebooks are no paper's): ``{"profiles": the profiles of ``profiles`` with a record of the folder,
    "rows": [...]}``, one row per notebook and claim id whose record at some profile carries the paper's value
    (claims without one are left out): notebook, claim, kind (empirical / accounting), what the claim tests,
    the paper's value and its source (from the first profile whose record has one), and per profile the kit's
    estimate [95 % interval], n and the verdict ("no record" where the notebook has none at that profile,
    "not tested" where its record lacks the claim). Rows by notebook, then in the records' claim order."""
    found: dict[str, list] = {}
    claims: dict[str, dict] = {}
    have: dict[tuple, set] = {}
    for prof in profiles:
        for key, _, doc in _collect(prof):
            paper = _paper_of(key)
            if paper == "kit":
                continue
            if prof not in found.setdefault(paper, []):
                found[paper].append(prof)
            have.setdefault((paper, prof), set()).add(key)
            for c in _claims(doc):
                row = claims.setdefault(paper, {}).setdefault((key, c["claim"]), {
                    "notebook": key, "claim": c["claim"],
                    "kind": "accounting" if c.get("accounting") else "empirical",
                    "tested": c.get("target", ""), "paper": None, "paper source": "", "by_profile": {}})
                if row["paper"] is None and c.get("paper") is not None:
                    row["paper"], row["paper source"] = c["paper"], c.get("paper_source", "")
                row["by_profile"][prof] = c
    order = [p for p in PAPER_TITLES if p in found] + sorted(p for p in found if p not in PAPER_TITLES)
    out = {}
    for paper in order:
        rows = []
        for (key, _), row in sorted(claims.get(paper, {}).items(), key=lambda kv: kv[0][0]):  # stable: claim order
            if row["paper"] is None:
                continue
            shown = {k: v for k, v in row.items() if k != "by_profile"}
            for prof in found[paper]:
                c = row["by_profile"].get(prof)
                missing = "no record" if key not in have[(paper, prof)] else "not tested"
                shown[f"kit ({prof})"] = _estimate_text(c) if c else missing
                shown[f"verdict ({prof})"] = c["verdict"] if c else missing
            rows.append(shown)
        out[paper] = {"profiles": found[paper], "rows": rows}
    return out


def paper_sections(profiles=COMPARED_PROFILES) -> list[str]:
    """The README's "papers' numbers beside the kit's" section: one table per paper (:func:`paper_comparison`)."""
    papers = paper_comparison(profiles)
    lines = ["## The papers' numbers beside the kit's", "",
             "Per paper, every claim whose quantity the paper reports: the paper's value with the table or section it "
             "comes from (derived from the paper's own numbers where the claim reads a ratio or difference of them, "
             "as its source says), and the kit's estimate of the same quantity with its 95 % interval and number of "
             "seeds, and its verdict, at each profile with records under `reports/` (smoke excluded: it only checks "
             "that the code runs). The kit's models and budgets are far below the papers' (each notebook's section "
             "says how far), so the paper's value is a point of comparison, not the bound the verdict tests: "
             "`tested` is. Claims whose quantity the paper does not report are in the tables below, not here.", ""]
    for paper, spec in papers.items():
        lines += [f"### {PAPER_TITLES.get(paper, paper)}", ""]
        if not spec["rows"]:
            lines += [f"No claim recorded for `{paper}/` carries a paper value (profiles with records: "
                      f"{', '.join(spec['profiles'])}).", ""]
            continue
        lines += _md_table(spec["rows"])
    return lines if papers else []


def build_readme(profile: str = "cpu") -> Path:
    """reports/README.md: the papers' numbers beside the kit's (:func:`paper_sections`: one table per paper,
    every profile but smoke), every claim with its verdict, estimate, interval and n (all notebooks in one
    table), then per notebook its claims, headline figure, summary table and conclusions."""
    lines = [f"# Reference results ({profile} profile)", "",
             "Generated by `make reproduce` (`python -m lrkit.reports readme`); do not edit by hand. "
             "Each section is one notebook's summary, computed by the notebook from its own run.", "",
             "Verdicts come from one rule (`lrkit.claims`): per claim a quantity per seed (a paired difference or "
             "ratio of two arms, or one arm's value), Student's t 95 % interval of its mean across seeds, and "
             "**holds** when the whole interval lies on the claim's side of the tested bound, **contradicted** "
             "when it lies wholly on the other side, else **unresolved at this scale**, with its reason (one seed, "
             "failed runs, too few seeds for the observed effect, or no effect at this scale). A failed or diverged "
             "run counts at the worst value of its metric among the notebook's runs. Byte counts, analytic FLOPs "
             "and formula identities are accounting: shown in tables of their own and left out of the tally.", ""]
    lines += paper_sections()
    lines += ["## All claims", ""]
    docs = _collect(profile)
    lines += [f"Verdicts: {tally([c for _, _, doc in docs for c in _claims(doc)])}.", "",
              "### Empirical claims", ""]
    lines += _md_table([{"notebook": key, **{k: v for k, v in r.items() if k != "source"}}
                        for key, _, doc in docs for r in _claim_rows(doc)])
    accounting = [{"notebook": key, **{k: v for k, v in r.items() if k != "source"}}
                  for key, _, doc in docs for r in _claim_rows(doc, accounting=True)]
    if accounting:
        lines += [f"### {ACCOUNTING_TITLE}", "", *_md_table(accounting)]
    for key, d, doc in docs:
        ex, summ = doc.get("execution", {}), doc.get("summary", {})
        rel = d.relative_to(REPORTS_DIR).as_posix()
        lines += [f"## {key}", "",
                  f"{ex.get('device_name', '?')}, run time {ex.get('wall_time_s', 0):.0f} s, commit {_short(doc)}.", ""]
        lines += _md_table(_claim_rows(doc))
        if _claims(doc, accounting=True):
            lines += [f"**{ACCOUNTING_TITLE}**", "", *_md_table(_claim_rows(doc, accounting=True))]
        lines += _md_table(summ.get("table", []))
        lines += [f"- {c}" for c in summ.get("conclusions", [])]
        if summ.get("headline"):
            lines += ["", f"![{key}]({rel}/{summ['headline']})"]
        lines.append("")
    from lrkit.bench import readme_section  # `make bench`'s committed records, with their hardware

    bench = readme_section()
    if bench:
        lines += ["## Benchmarks (`make bench`)", "", *bench, ""]
    path = REPORTS_DIR / "README.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    print(f"wrote {path}")
    write_run_times(docs, profile)
    return path


TIMES_BEGIN, TIMES_END = "<!-- run-times: generated by `python -m lrkit.reports readme`; do not edit -->", \
    "<!-- /run-times -->"


def write_run_times(docs, profile: str = "cpu") -> list[Path]:
    """The measured run time of each notebook (its record's execution block) into the block between
    :data:`TIMES_BEGIN` and :data:`TIMES_END` of its folder's README (``notebooks/<paper>/README.md``; the
    top-level notebooks into ``notebooks/README.md``), so the READMEs always state the committed runs' times."""
    by_folder: dict[Path, list] = {}
    for key, _, doc in docs:
        folder = (NOTEBOOKS_DIR / key).parent
        by_folder.setdefault(folder, []).append((key, doc.get("execution", {})))
    written = []
    for folder, rows in by_folder.items():
        readme = folder / "README.md"
        if not readme.exists():
            continue
        total = sum(ex.get("wall_time_s", 0) for _, ex in rows)
        machines = sorted({ex.get("device_name", "?") for _, ex in rows})
        table = [TIMES_BEGIN, "", f"Measured {profile}-profile run times of the committed records (`make reproduce`, one "
                 f"torch thread per notebook, two notebooks side by side; {', '.join(machines)}):", "",
                 "| notebook | run time | executed |", "|---|---|---|"]
        table += [f"| `{Path(key).name}.ipynb` | {ex.get('wall_time_s', 0) / 60:.1f} min | "
                  f"{ex.get('executed_at', '?')[:16]} |" for key, ex in sorted(rows)]
        table += [f"| **folder total** | **{total / 60:.0f} min** of single-thread work | |", "", TIMES_END]
        text = readme.read_text()
        if TIMES_BEGIN in text and TIMES_END in text:
            head, rest = text.split(TIMES_BEGIN, 1)
            text = head + "\n".join(table) + rest.split(TIMES_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Run times\n\n" + "\n".join(table) + "\n"
        atomic_write_bytes(readme, text.encode())
        written.append(readme)
    return written


# --------------------------------------------------------------------------------------------- check
# Final metrics that are measurements of this machine at run time (wall clock), not computed from the seed:
# reported beside the computed ones, never a reason to fail.
MEASURED = re.compile(r"(_s|wall_time|rss_bytes|cuda_bytes)$")


# Same seed, same numbers on CPU, to the last bits: float64 BLAS results can differ in the last bit
# between processes (memory alignment picks the kernel; seen: 8e-15 relative on a least-squares optimum),
# far below any change a code edit makes.
CHECK_RTOL = 1e-9


def check_reports(profile: str = "cpu", rtol: float = CHECK_RTOL, ref: str = "HEAD") -> bool:
    """Compare every run's final metrics in the working tree with the committed reference at ``ref``.

    Computed metrics (losses, accuracies, byte and FLOP counts, ranks) must agree within ``rtol`` (default
    :data:`CHECK_RTOL`: same seed, same numbers on CPU, last-bit BLAS noise aside); measured ones (wall and projector times, :data:`MEASURED`) are listed
    with their ratio and never fail. Boolean read-outs of a run (``diverged``, ``unstable``, ``failed``: every
    boolean in its final metrics) must be the same, and so must every claim's verdict in the notebook's summary.
    Warns when a committed run was made in another environment than requirements.lock describes now. Returns
    False if a computed metric, a boolean or a verdict differs, or a committed run or claim is missing from the
    fresh results.
    """
    from lrkit._lock import lock_digest

    if profile not in records.PROFILES:
        raise ValueError(f"Invalid profile: {profile!r} (expected one of {list(records.PROFILES)})")
    ok, rows, measured, verdicts, other_env = True, [], [], [], set()
    tracked = subprocess.run(["git", "ls-files", "reports"], cwd=REPO_ROOT, capture_output=True,
                             text=True).stdout.split()
    refs = [p for p in tracked if p.endswith(f"/{profile}/metrics.json")]
    if not refs:
        print(f"no committed {profile} reference results under reports/")
        return False
    lock_now = lock_digest()
    for rel in refs:
        committed = json.loads(subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=REPO_ROOT,
                                              capture_output=True, text=True, check=True).stdout)
        fresh_path = REPO_ROOT / rel
        fresh = json.loads(fresh_path.read_text()) if fresh_path.exists() else {"runs": {}}
        nb = rel.removesuffix("/metrics.json")
        for run, cdoc in committed["runs"].items():
            if cdoc.get("lock_sha256") != lock_now:
                other_env.add(nb)
            fdoc = fresh["runs"].get(run)
            for metric, cval in cdoc.get("final", {}).items():
                fval = None if fdoc is None else fdoc.get("final", {}).get(metric)
                if isinstance(cval, bool):  # diverged, unstable, failed: the same, exactly
                    good = isinstance(fval, bool) and fval == cval
                    ok &= good
                    rows.append((nb, run, metric, cval, fval, 0.0 if good else float("inf"), good))
                    continue
                if not isinstance(cval, (int, float)):
                    continue
                if MEASURED.search(metric):
                    measured.append((nb, run, metric, cval, fval))
                    continue
                if fval is None:
                    diff, good = float("inf"), False
                else:
                    diff = abs(fval - cval) / max(abs(cval), 1e-12)
                    good = diff <= rtol
                ok &= good
                rows.append((nb, run, metric, cval, fval, diff, good))
        # every claim's verdict: the same as the reference's (a claim missing from the fresh results differs)
        fresh_verdicts = {c.get("claim"): c.get("verdict") for c in fresh.get("summary", {}).get("claims", [])}
        for c in committed.get("summary", {}).get("claims", []):
            fv = fresh_verdicts.get(c.get("claim"))
            good = fv == c.get("verdict")
            ok &= good
            verdicts.append((nb, c.get("claim"), c.get("verdict"), fv, good))
    print(f"{'notebook':<34} {'run':<18} {'metric':<16} {'committed':>12} {'fresh':>12} {'rel diff':>9}")
    for nb, run, metric, cval, fval, diff, good in rows:
        committed_text = str(cval) if isinstance(cval, bool) else f"{cval:.6g}"
        print(f"{nb:<34} {run:<18} {metric:<16} {committed_text:>12} {_fmt(fval, 6):>12} {diff:>9.2e}"
              f"{'' if good else '  <-- differs'}")
    if verdicts:
        print(f"\n{'notebook':<34} {'claim':<36} {'committed verdict':<26} {'fresh verdict':<26}")
        for nb, claim, cv, fv, good in verdicts:
            print(f"{nb:<34} {claim!s:<36} {cv!s:<26} {fv if fv is not None else 'missing':<26}"
                  f"{'' if good else '  <-- differs'}")
    if measured:
        print(f"\nmeasured on this machine (not compared): {'committed':>12} {'fresh':>12} {'ratio':>7}")
        for nb, run, metric, cval, fval in measured:
            ratio = "-" if not fval or not cval else f"{fval / cval:.2f}"
            print(f"{nb:<34} {run:<18} {metric:<16} {cval:>12.4g} {_fmt(fval, 4):>12} {ratio:>7}")
    for nb in sorted(other_env):
        print(f"WARNING: {nb}: committed runs were made with another environment than requirements.lock "
              f"(lock sha256 {lock_now[:12]}) or before the lock existed")
    print(f"{'OK' if ok else 'DIFFERS'}: {sum(r[-1] for r in rows)}/{len(rows)} computed metrics "
          f"{'identical' if rtol == 0 else f'within rtol={rtol}'}; {len(measured)} measured figures listed"
          + (f"; {sum(v[-1] for v in verdicts)}/{len(verdicts)} claim verdicts unchanged" if verdicts else ""))
    return ok


# ---------------------------------------------------------------------------------------- seed check
def seed_check(nb: str | Path, seeds: list[int], profile: str = "cpu") -> dict:
    """Rerun a notebook with another set of seeds (same size as the reference's) into a scratch directory
    and compare its verdicts with the committed reference's: the holds/contradicted verdicts must not depend
    on the particular seeds. Writes ``reports/seed_check/<notebook>.json`` and returns it."""
    nb = Path(nb).resolve()
    key = notebook_key(nb)
    ref = records.load(records.report_dir(key, profile))
    with tempfile.TemporaryDirectory() as tmp:
        other = records.load(run_notebook(nb, profile, overrides={"seeds": list(seeds)}, final=Path(tmp) / profile))
    ref_seeds = sorted({r["seed"] for r in ref["runs"].values() if not r["config"].get("tuning")})
    a = {c["claim"]: c["verdict"] for c in ref["summary"].get("claims", [])}
    b = {c["claim"]: c["verdict"] for c in other["summary"].get("claims", [])}
    # A firm verdict (holds or contradicted) on one seed set must be the same verdict on the other.
    changed = sorted(c for c in a if a[c] != b.get(c))
    flips = [c for c in changed if {a[c], b.get(c)} & {"holds", "contradicted"}]
    doc = {"notebook": key, "profile": profile, "reference_seeds": ref_seeds, "other_seeds": list(seeds),
           "reference": a, "other": b, "firm_verdicts_not_reproduced": flips, "changed": changed,
           "agree": not flips, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_commit": records.git_commit()}
    path = REPORTS_DIR / "seed_check" / f"{key.replace('/', '__')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    print(f"{key}: reference seeds {ref_seeds} vs {list(seeds)}")
    for c in a:
        print(f"  {c:<36} {a[c]:<26} {b.get(c, '-'):<26}{'  <-- changed' if c in changed else ''}")
    print(f"holds/contradicted verdicts not reproduced by the other seeds: {flips or 'none'} -> {path}")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrkit.reports", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    r = sub.add_parser("run", help="execute notebooks with papermill and export them", parents=[common])
    r.add_argument("notebooks", nargs="+")
    r.add_argument("--profile", default="auto")
    r.add_argument("--if-stale", action="store_true",
                   help="skip notebooks whose results exist and whose inputs have not changed since their run")
    i = sub.add_parser("index", help="write reports/index.html", parents=[common])
    i.add_argument("--profile", default="auto")
    sub.add_parser("readme", help="write reports/README.md from the cpu results", parents=[common])
    sc = sub.add_parser("seed-check", help="rerun a notebook with other seeds, compare its verdicts", parents=[common])
    sc.add_argument("notebook")
    sc.add_argument("--seeds", required=True, help="comma-separated, e.g. 5,6,7,8,9")
    sc.add_argument("--profile", default="cpu")
    c = sub.add_parser("check", help="diff fresh results against the committed reference", parents=[common])
    c.add_argument("--profile", default="cpu")
    c.add_argument("--rtol", type=float, default=CHECK_RTOL, help="for computed metrics (default %(default)s)")
    c.add_argument("--ref", default="HEAD")
    args = ap.parse_args(argv)
    from lrkit.cli import run_cli

    return run_cli(lambda: _command(args), debug=args.debug, prog=ap.prog)


def _command(args) -> int:
    # `kill` or a CI timeout: unwind through the cleanup that removes the staging directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cmd == "run":
        for nb in args.notebooks:
            why = stale_reason(nb, args.profile) if args.if_stale else "asked"
            if why is None:
                print(f"[{notebook_key(Path(nb))}] up to date (notebook, configs, tuned rates, lrkit code and lock "
                      "unchanged since its run): skipped; FORCE=1 reruns it", flush=True)
                continue
            if args.if_stale:
                print(f"[{notebook_key(Path(nb))}] {why}: running", flush=True)
            run_notebook(nb, args.profile)
    elif args.cmd == "index":
        build_index(args.profile)
    elif args.cmd == "readme":
        build_readme("cpu")
    elif args.cmd == "seed-check":
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"Invalid --seeds: {args.seeds!r} (expected comma-separated ints, e.g. 5,6,7)") from None
        seed_check(args.notebook, seeds, args.profile)
    elif args.cmd == "check":
        return 0 if check_reports(args.profile, args.rtol, args.ref) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
