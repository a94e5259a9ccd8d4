"""services.common.runtime: a background job gives the CPU up to the payment path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.runtime import BACKGROUND_NICENESS

ROOT = Path(__file__).resolve().parents[2]
# A service whose main prints its niceness and returns at once.
SERVICE = """
import os, sys
from services.common.runtime import run_service
async def main(cfg, stop):
    print(os.nice(0))
run_service("probe", [], main, background=sys.argv[1] == "background")
"""


def niceness_of(kind: str) -> int:
    done = subprocess.run([sys.executable, "-c", SERVICE, kind], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, lowered_by", [("background", BACKGROUND_NICENESS), ("payment-path", 0)])
def test_only_background_jobs_run_at_a_lower_priority(kind, lowered_by):
    assert niceness_of(kind) == min(os.nice(0) + lowered_by, 19)


def test_the_only_background_job_is_the_anchoring_one():
    """Its burst (a minute of audit rows) stalled the payment path, and it holds no lock the path
    waits for; the retention job holds payments' locks (niced, it would hold them longer)."""
    background = {path.relative_to(ROOT).as_posix() for path in (ROOT / "services").rglob("*.py")
                  if "background=True" in path.read_text()}
    assert background == {"services/ledger/anchors.py"}
