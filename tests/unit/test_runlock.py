"""eagle_dist.engine.runlock: who holds a run folder, and when a lock is stale (no trainer here;
tests/test_faults.py launches real trainers against each other).

    python -m pytest -q tests/test_runlock.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from eagle_dist.engine.runlock import LOCK_NAME, RunLock, RunLockedError

pytestmark = pytest.mark.faults


def _plant(run_dir, age_s: float = 0.0, **fields) -> dict:
    """A lock file as another job would have written it, last touched `age_s` ago."""
    record = {"host": "node-b", "pid": 4321, "pid_start": None, "boot_id": "other-boot", "pid_namespace": "1",
              "slurm_job_id": None, "elastic_run_id": None, "started_at": "2024-05-01T10:00:00+0000",
              "token": "theirs", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return record


def _token(run_dir) -> str:
    return json.loads((run_dir / LOCK_NAME).read_text())["token"]


@pytest.fixture
def sleeper():
    """A live process that is not us (a holder that is still running)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_free_folder_is_locked_and_released(tmp_path):
    lock = RunLock(tmp_path, slurm_job="9")
    lock.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["slurm_job_id"] == "9"
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no private or stale files left
    again = RunLock(tmp_path)
    again.acquire()
    assert again.took_over is None
    # A trainer of this same process that was never closed is no live competitor.
    leftover = RunLock(tmp_path)
    leftover.acquire()
    assert leftover.took_over["why"] == "an earlier trainer of this process that was never closed"


def test_another_node_is_trusted_until_its_heartbeat_is_old(tmp_path):
    _plant(tmp_path, age_s=30, slurm_job_id="777")
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path, stale_after_s=600, slurm_job="778").acquire()
    message = str(refused.value)
    assert "is in use by another training job (host node-b, pid 4321, Slurm job 777" in message
    assert "choose another train.run_name" in message
    assert _token(tmp_path) == "theirs"

    _plant(tmp_path, age_s=900, slurm_job_id="777")
    lock = RunLock(tmp_path, stale_after_s=600, slurm_job="778")
    lock.acquire()
    assert _token(tmp_path) == lock.token and "heartbeat stopped" in lock.took_over["why"]


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, sleeper):
    # Even with the old record fresh and on this host with a live pid: Slurm restarts a job id
    # only after its previous run ended.
    _plant(tmp_path, host=socket.gethostname(), pid=sleeper.pid, slurm_job_id="4242")
    lock = RunLock(tmp_path, slurm_job="4242")
    lock.acquire()
    assert "Slurm job (4242, requeued or restarted)" in lock.took_over["why"]


def test_same_host_checks_whether_the_pid_still_runs_that_process(tmp_path, sleeper):
    me = RunLock(tmp_path).record
    machine = {k: me[k] for k in ("host", "boot_id", "pid_namespace")}
    _plant(tmp_path, pid=sleeper.pid, pid_start=None, **machine)
    with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
        RunLock(tmp_path).acquire()

    _plant(tmp_path, pid=sleeper.pid, pid_start="1", **machine)  # that pid is now another process
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"process {sleeper.pid} on this host, which no longer runs" == lock.took_over["why"]
    lock.release()

    sleeper.kill()
    sleeper.wait()
    _plant(tmp_path, pid=sleeper.pid, **machine)  # killed with SIGKILL: the file stayed
    RunLock(tmp_path).acquire()


def test_two_launches_taking_over_one_stale_lock_cannot_both_win(tmp_path):
    stale = _plant(tmp_path, age_s=900)
    first = RunLock(tmp_path, stale_after_s=60)
    first.acquire()
    # The second judged the same stale record before the first replaced it, and renames late.
    second = RunLock(tmp_path, stale_after_s=60)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        second._take_over(stale, "judged stale a moment ago")
    assert _token(tmp_path) == first.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_release_never_removes_a_lock_taken_over_by_someone_else(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    _plant(tmp_path)  # e.g. taken over after this job's node looked dead for too long
    lock.release()
    assert _token(tmp_path) == "theirs"
