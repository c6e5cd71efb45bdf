"""Helper processes end with the command that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maesil.tools.process_lifetime import SIGTERM_EXIT_STATUS, exit_with_parent, sigterm_as_exit, stop_processes


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (ended, not yet reaped by whatever adopted it) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no /proc, or gone meanwhile
        return True
    return state != "Z"


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("watched", [True, False])
def test_a_watched_child_ends_when_its_parent_is_killed_and_an_unwatched_one_does_not(tmp_path, watched):
    child = textwrap.dedent(f"""
        import time
        from maesil.tools.process_lifetime import exit_with_parent
        if {watched}:
            exit_with_parent(0.05)
        print("ready", flush=True)
        time.sleep(30)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\\n"
        print(child.pid, flush=True)
        time.sleep(30)
    """)
    middle = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    grandchild = int(middle.stdout.readline())
    try:
        middle.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        middle.wait()
        assert _wait_gone(grandchild, seconds=10.0 if watched else 1.0) is watched
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_the_watch_refuses_a_poll_interval_that_is_not_positive():
    with pytest.raises(ValueError, match="poll_seconds must be positive"):
        exit_with_parent(0)


def test_stop_processes_ends_what_runs_and_kills_what_ignores_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    stubborn = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline() == "ready\n"
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    stop_processes([polite, stubborn, done], grace_seconds=0.5)
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert done.returncode == 0


def test_sigterm_to_the_evidence_command_stops_its_running_stage(tmp_path):
    stage_pid = tmp_path / "stage.pid"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from maesil.tools.evidence import EvidencePlan, Stage, run_stages
        from maesil.tools.process_lifetime import sigterm_as_exit
        sleeper = "import os, time; open({str(stage_pid)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
        never = Path({str(tmp_path)!r}) / "never"
        EvidencePlan.stages = lambda self: [Stage("sleep", [sys.executable, "-c", sleeper], never)]
        with sigterm_as_exit():
            run_stages(EvidencePlan(out=Path({str(tmp_path)!r}) / "evidence"))
    """)
    command = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not (stage_pid.exists() and stage_pid.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(stage_pid.read_text())
    command.send_signal(signal.SIGTERM)
    assert command.wait(timeout=20) == SIGTERM_EXIT_STATUS
    assert _wait_gone(pid, seconds=5.0)


def test_sigterm_raises_exit_only_inside_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_exit():
        with pytest.raises(SystemExit) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes of the main thread
        assert raised.value.code == SIGTERM_EXIT_STATUS
    assert signal.getsignal(signal.SIGTERM) is before
