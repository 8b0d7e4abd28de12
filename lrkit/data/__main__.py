"""`python -m lrkit.data`: fetch and verify every offline source (what `make data` runs)."""
import sys

from lrkit.data import REGISTRY, fetch_all

if __name__ == "__main__":
    status = fetch_all()
    width = max(map(len, status))
    for name, s in status.items():
        print(f"{name:<{width}}  {'ok' if s == 'ok' else 'FAILED: ' + s}  ({REGISTRY[name].origin})")
    sys.exit(0 if all(s == "ok" for s in status.values()) else 1)
