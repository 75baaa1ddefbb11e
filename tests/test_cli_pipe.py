"""`ratatouille plan ... | head` ends quietly, as a Unix filter does when its reader goes away."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_pipe_ends_the_plan_without_a_traceback():
    # `| true` closes the pipe before the plan writes its first line: every write fails (EPIPE).
    exe = Path(sys.executable).parent / "ratatouille"
    plan = ROOT / "crds/examples/paper/domainnet.yaml"
    proc = subprocess.run(["bash", "-c", f"{exe} plan {plan} | true; echo rc=${{PIPESTATUS[0]}} >&2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip() == "rc=141", proc.stderr[-2000:]
