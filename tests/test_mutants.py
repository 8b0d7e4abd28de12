"""Every mutant of tests/mutants/*.yaml still finds its text exactly once (a mutant whose code has moved tests
nothing; `make mutants` would stop on it, this catches it in `make test`), and names tests that exist."""
from pathlib import Path

from run_mutants import MUTANTS_DIR, ROOT, load_mutants


def test_every_mutant_applies_once_and_names_existing_tests():
    mutants = load_mutants(sorted(MUTANTS_DIR.glob("*.yaml")))
    assert len(mutants) >= 100
    stale = [(m["source"], m["name"]) for m in mutants if (ROOT / m["file"]).read_text().count(m["find"]) != 1]
    assert not stale, f"mutants whose text does not occur exactly once: {stale}"
    def exists(test: str) -> bool:
        path, _, name = test.partition("::")
        return (ROOT / path).exists() and (not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text())
    missing = [t for m in mutants for t in m["test"] if not exists(t)]
    assert not missing, f"mutants naming tests that do not exist: {missing}"
