"""The newcomer's first command: ``scripts/demo --once`` runs its tour to the end and
finds what it tells (it checks its own claims and exits 1 on any that fails)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from tests.integration.federation import REPO

pytestmark = pytest.mark.integration


def test_the_demo_tour_shows_what_it_says() -> None:
    # Its own servers, broker and bridges, on free ports: nothing shared with the suite.
    proc = subprocess.Popen([sys.executable, "scripts/demo.py", "--once"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the demo stops what it started on SIGTERM
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # Each step's own claim, as a newcomer reads it (before: "exit status 1: the alert
    # clears", the restarted bridge ready while `lag` still counted heartbeats behind).
    for claim in ("✓ ap-south  has /critical/flags/new-checkout",
                  "all regions agree on",
                  "exit status 1: what a cron job or a monitoring check alerts on",
                  "exit status 0: the alert clears",
                  "HEALTHY: ",
                  "✓ eu-west   no longer has /critical/services",
                  "identical: us-east, eu-west, ap-south",
                  "exit status 0: identical"):
        assert claim in out, f"{claim!r} not in:\n{out}"
    # The conflict as eu-west recorded it, whichever write won.
    assert re.search(r"winner (local \(eu-west\)|remote \(us-east\)) by lww", out), out
    assert "Traceback" not in out, out
