"""launch/slurm/train.sbatch against a real one-node Slurm: pre-timeout signal, checkpoint,
requeue, resume with the same run folder and MLflow run.

    python -m pytest -m slurm tests/distributed/test_slurm.py

Debian's slurm-wlm (installed here with apt-get when missing and running as root) runs as root
with auth/none and cred/none, proctrack/linuxproc and task/none, its state and logs in a
temporary folder, slurmctld and slurmd on 127.0.0.1 with free ports.  The test starts both
daemons and stops them by their PIDs afterwards.  The requeued job would wait Slurm's requeue
delay (BeginTime, about two minutes on 22.05); the test releases it with
`scontrol update StartTime=now`, as an admin could.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, free_port, launch_env

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
MAX_STEPS = 40

pytestmark = pytest.mark.slurm


def _install_slurm() -> None:
    """Install slurm-wlm with apt-get if it is missing; skip only when that is impossible."""
    if all(shutil.which(tool) for tool in SLURM_TOOLS):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed, no Slurm to test against:\n{done.stderr[-2000:]}")
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    assert not missing, f"slurm-wlm installed but {missing} are not on PATH"


def _slurm_conf(root: Path, node: str) -> str:
    return f"""\
ClusterName=eagletest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: yields the environment the Slurm commands need."""
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        for cmd, log in ((["slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld.out"),
                         (["slurmd", "-D", "-f", str(conf), "-N", node], "slurmd.out")):
            with open(root / log, "w") as out:
                daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True))
        state = ""
        for _ in range(120):
            assert all(d.poll() is None for d in daemons), _daemon_logs(root)
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        assert state == "idle", f"node state {state!r}\n{_daemon_logs(root)}"
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=env, check=False)
        for proc in reversed(daemons):
            _stop(proc)


def _daemon_logs(root: Path) -> str:
    files = sorted(root.glob("*.out")) + sorted(root.glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in files)


def _job(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_for(what: str, condition, log: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    text = log.read_text()[-6000:] if log.exists() else "(no job log)"
    pytest.fail(f"timed out waiting for {what}\n--- job log\n{text}")


def _loss_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row["metrics"]]


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm, shards, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"], "EAGLE_DIR": str(REPO),
           "EAGLE_PYTHON": sys.executable, "NPROC_PER_NODE": "2"}
    args = [*TINY, *shards, f"train.output_dir={tmp_path / 'runs'}", "train.run_name=slurm",
            f"train.max_steps={MAX_STEPS}", "train.ckpt_interval=4", "train.eval_interval=1000",
            "train.keep_last=100", "dist.cpu_threads=1"]
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", str(SBATCH), *args],
                               capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    job = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"eagle-{job}.out"
    run_dir = tmp_path / "runs" / f"slurm-{job}"  # the run folder carries the job id
    ckpts = run_dir / "checkpoints"

    def ended() -> bool:
        return _job(job, slurm).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    _wait_for("the first checkpoint", lambda: (ckpts / "step-00000004" / "COMPLETE").is_file() or ended(), log)
    assert not ended(), f"the job ended before the signal:\n{log.read_text()[-6000:]}"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)

    _wait_for("the requeue", lambda: _job(job, slurm).get("Restarts") == "1"
              and _job(job, slurm).get("JobState") == "PENDING", log)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    _wait_for("the requeued job to finish", ended, log)

    info, text = _job(job, slurm), log.read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), text[-6000:]
    stopped_at = int(re.search(r"stop requested by SIGUSR1 .*: saved step (\d+)", text).group(1))
    assert 4 <= stopped_at < MAX_STEPS
    assert f"requeued Slurm job {job}" in text
    assert f"resumed from {ckpts / f'step-{stopped_at:08d}'} at step {stopped_at}" in text
    assert "restart 1" in text and f"final results: {MAX_STEPS} steps" in text

    preempted = json.loads((ckpts / f"step-{stopped_at:08d}" / "trainer_state.json").read_text())["extra"]
    final = json.loads((ckpts / f"step-{MAX_STEPS:08d}" / "trainer_state.json").read_text())["extra"]
    assert preempted["reason"] == "preemption" and final["reason"] == "final"
    run_id = preempted["mlflow_run_id"]
    assert final["mlflow_run_id"] == run_id

    # Every step logged exactly once across the two runs: the stop saved the step it reached.
    assert _loss_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, MAX_STEPS + 1))


def test_sweep_runs_as_a_job_array_whose_tasks_requeue_and_resume(slurm, shards, tmp_path):
    """`eagle-dist sweep --slurm`: one array task per run (launch/slurm/sweep.sbatch -> train.sbatch);
    a task stopped by SIGUSR1 requeues and resumes in its fixed run folder; the report sees both."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "sweep"
    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"], "EAGLE_DIR": str(REPO), "EAGLE_PYTHON": sys.executable}
    cmd = [sys.executable, "-m", "eagle_dist.sweep", "--out", str(out), "--config", str(REPO / "configs" / "default.yaml"),
           "--seeds", "0-1", "--nproc", "1", "--slurm", *TINY, *shards, "train.max_steps=24", "train.ckpt_interval=4",
           "train.eval_interval=1000", "train.keep_last=100", "dist.cpu_threads=1"]
    submitted = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                               check=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    array = (out / "slurm_jobs.txt").read_text().split()[0]
    tasks = [f"{array}_0", f"{array}_1"]
    ckpts = out / "runs" / "base-seed0" / "checkpoints"  # no job id in the name: a later submission finds it
    log = out / "logs" / f"slurm-{array}_0.out"

    def ended(task: str) -> bool:
        return _job(task, slurm).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    _wait_for("task 0's first checkpoint", lambda: (ckpts / "step-00000004" / "COMPLETE").is_file() or ended(tasks[0]), log)
    assert not ended(tasks[0]), log.read_text()[-6000:]
    subprocess.run(["scancel", "--batch", "--signal=USR1", tasks[0]], env=slurm, check=True)
    _wait_for("the requeue", lambda: _job(tasks[0], slurm).get("Restarts") == "1"
              and _job(tasks[0], slurm).get("JobState") == "PENDING", log)
    subprocess.run(["scontrol", "update", f"JobId={tasks[0]}", "StartTime=now"], env=slurm, check=True)
    _wait_for("both tasks to finish", lambda: all(ended(t) for t in tasks), log)

    text = log.read_text()
    assert [_job(t, slurm)["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], text[-6000:]
    stopped_at = int(re.search(r"stop requested by SIGUSR1 .*: saved step (\d+)", text).group(1))
    assert 4 <= stopped_at < 24 and "requeued Slurm job" in text
    assert f"resumed from {ckpts / f'step-{stopped_at:08d}'} at step {stopped_at}" in text
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base-seed0", "base-seed1"]

    reported = subprocess.run([sys.executable, "-m", "eagle_dist.sweep", "report", str(out)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert reported.returncode == 0, reported.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [(r["run"], r["state"], r["step"]) for r in report["runs"]] == [("base-seed0", "finished", 24),
                                                                            ("base-seed1", "finished", 24)]
    assert report["arms"]["base"]["metrics"]["cluster_official_mIoU"]["final"]["n"] == 2
    spec = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(spec["tracking_uri"])
    parent = client.get_run(spec["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["base-seed0", "base-seed1"]
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                               check=False)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len((out / "slurm_jobs.txt").read_text().splitlines()) == 1
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_scancel_signals_every_process_and_the_stop_saves_a_checkpoint_the_rerun_resumes(slurm, shards, tmp_path):
    """`scancel JOB` sends SIGTERM to every process of the job (the batch shell, srun, torchrun,
    the ranks and their loader workers) and SIGKILL KillWait seconds later: the ranks save in
    between and the log holds one stop line, no traceback."""
    from eagle_dist.checkpoint import verify_checkpoint

    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"], "EAGLE_DIR": str(REPO),
           "EAGLE_PYTHON": sys.executable, "NPROC_PER_NODE": "2"}
    common = [*TINY, *shards, f"train.output_dir={tmp_path / 'runs'}", "data.num_workers=2", "train.ckpt_interval=4",
              "train.eval_interval=1000", "dist.cpu_threads=1"]
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", str(SBATCH), *common,
                                "train.run_name=cancel", "train.max_steps=100000"],
                               capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    job = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"eagle-{job}.out"
    run_name = f"cancel-{job}"
    ckpts = tmp_path / "runs" / run_name / "checkpoints"

    def ended() -> bool:
        return _job(job, slurm).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    _wait_for("the first checkpoint", lambda: (ckpts / "step-00000004" / "COMPLETE").is_file() or ended(), log)
    assert not ended(), f"the job ended before the signal:\n{log.read_text()[-6000:]}"
    subprocess.run(["scancel", job], env=slurm, check=True)
    _wait_for("the job to end", ended, log)
    _wait_for("the ranks to leave", lambda: not (tmp_path / "runs" / run_name / "LOCK").exists(), log, timeout_s=30)

    text = log.read_text()
    assert _job(job, slurm)["JobState"] == "CANCELLED"
    for bad in ("Traceback", "exited unexpectedly", "SignalException"):
        assert bad not in text, text[-6000:]
    saved = [line for line in text.splitlines() if line.startswith("stop requested by SIGTERM: saved step ")]
    assert len(saved) == 1, text[-6000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert step >= 4 and verify_checkpoint(ckpts / f"step-{step:08d}")

    # The same run folder outside Slurm (a resubmitted job would get a folder of its own id).
    rerun = subprocess.run(
        [sys.executable, str(REPO / "launch" / "torchrun.py"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "default.yaml"), *common,
         f"train.run_name={run_name}", f"train.max_steps={step + 1}"],
        capture_output=True, text=True, env=launch_env(), cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {ckpts / f'step-{step:08d}'} at step {step}" in rerun.stdout
