"""The committed cpu reference as a reviewer reads it (issue 19): every empirical claim reads a read-out that
moves, says how many of its runs failed, and shows a learning rate chosen at the edge of its grid in its row.
These read the committed records (make reproduce PROFILE=cpu writes them), not a fresh run."""
import json
from pathlib import Path

import pytest

from lrkit import claims, records

REPORTS = Path(records.__file__).resolve().parents[1] / "reports"
CPU = sorted(REPORTS.glob("**/cpu/metrics.json"))


def _claims(path):
    return json.loads(path.read_text()).get("summary", {}).get("claims", [])


@pytest.mark.parametrize("path", CPU, ids=[str(p.parent.parent.relative_to(REPORTS)) for p in CPU])
def test_every_empirical_claim_reads_a_read_out_that_moves_and_counts_its_failed_runs(path):
    for c in _claims(path):
        assert "failed" in c and "reason" in c, f"{c['claim']}: a record from before the failed-runs rule"
        # a claim comparing arms on a read-out that is the same everywhere measures nothing; a value claim tests
        # one arm against a bound (fedlrt's rank error of exactly 0 is its result, the row shows the flag)
        if not c.get("accounting") and c.get("quantity") != "value":
            assert claims.CONSTANT_READOUT not in c.get("flags", []), c["claim"]
        if c["failed"]:
            assert f"{c['failed']} of {c['runs']} runs failed" in c["note"], c["claim"]
        if c["verdict"] == claims.UNRESOLVED:
            assert c["reason"], f"{c['claim']}: unresolved without a reason"


@pytest.mark.parametrize("paper", sorted({p.parts[len(REPORTS.parts)] for p in CPU if "tuning" in p.parts}))
def test_an_edge_learning_rate_is_flagged_wherever_a_verdict_reads_it(paper):
    """Every tuning choice still at the edge of its grid after extension names its reason, and some verdict of
    the folder carries its flag text (the notebooks map tuned arms to their arm names)."""
    tuning = json.loads((REPORTS / paper / "tuning" / "cpu" / "metrics.json").read_text())["summary"]["tuned"]
    flagged = {f for p in CPU if p.parts[len(REPORTS.parts)] == paper for c in _claims(p) for f in c.get("flags", [])}
    for group, arms in tuning.items():
        for arm, t in arms.items():
            if t.get("at_edge"):
                assert t.get("edge_reason"), f"{paper} {group} {arm}: at the edge without a reason"
                assert any(f.startswith(f"{arm}: learning rate") for f in flagged), f"{paper} {group} {arm}"
