"""Run a command at the lowest CPU priority, the Jupyter kernels it starts included: ``python tests/background.py
CMD ...``. `make test` runs nbval this way beside the unit tests, so the notebooks take only the CPU the unit
tests leave idle while they wait on Flower's and torchrun's processes.

A plain ``nice`` does not reach the kernels: jupyter_client starts each in a session of its own, and Linux's
autogroup scheduling (on by default) shares the CPU between sessions first, whatever the niceness inside them. So
an IPython startup file (in a temporary IPYTHONDIR) sets each kernel's session to nice 19 as well
(/proc/self/autogroup; raising niceness needs no privilege). Where /proc/self/autogroup is missing the kernels
keep the inherited nice 19, which then suffices.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STARTUP = """\
try:
    with open("/proc/self/autogroup", "w") as f:  # this kernel's session yields to every other session
        f.write("19")
except OSError:
    pass
"""


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python tests/background.py CMD [ARGS ...]")
    with tempfile.TemporaryDirectory(prefix="lrkit-ipython-") as d:
        profile = Path(d, "profile_default")
        (profile / "startup").mkdir(parents=True)
        (profile / "startup" / "00-background.py").write_text(STARTUP)
        (profile / "ipython_kernel_config.py").write_text("c.HistoryManager.enabled = False\n")
        os.nice(19 - os.nice(0))
        return subprocess.call(argv, env={**os.environ, "IPYTHONDIR": d})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
