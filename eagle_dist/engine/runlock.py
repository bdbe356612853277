"""One live trainer per run folder: `runs/<name>/LOCK`, held by rank 0 of the live job.

    lock = RunLock(run_dir, stale_after_s=600, slurm_job="123", elastic_run="abc")
    lock.acquire()     # raises RunLockedError naming the other job (host, pid, Slurm job id)
    ...
    lock.release()     # Trainer.close(), on every exit it gets to run; a killed job leaves the
                       # file behind and the next launch recognises it as stale

The file is JSON: host, pid, the pid's start time, boot id and pid namespace (so a recycled
pid or a container with the same host name is not mistaken for the holder), the Slurm job id,
torchrun's rendezvous id, the start time and a random token.

Taking it.  Our record is written to a private file `LOCK.<token>` and hard-linked to `LOCK`.
link() is atomic and fails when `LOCK` exists, on local disks and on NFS, Lustre, GPFS and
BeeGFS alike (it is the classic NFS lock primitive; O_EXCL was unreliable on old NFS). A lost
NFS reply is covered by checking the private file's link count.

Who holds it.  A lock whose holder is gone is stale and is taken over:
  * the same Slurm job id as ours: Slurm starts a job again (requeue, `--requeue` after a node
    failure) only after its previous run ended, and so does torchrun after a worker failure
    (same rendezvous id);
  * the same machine (host name, boot id and pid namespace) and the holder pid no longer runs
    that process;
  * otherwise (another node): the holder's heartbeat stopped. The holder touches the file
    every `stale_after_s / 4` from a thread; the lock is stale when its mtime is older than
    `stale_after_s` as measured against the mtime of our private file, just written, so both
    times come from the file server's clock (no clock skew between nodes).
Taking over renames the stale file to `LOCK.stale.<token>` (atomic: of two launches that both
judged it stale only one rename finds it) and checks the renamed file is the one judged stale
before trying link() again; a fresh lock renamed by mistake is linked back and we refuse.

Shared file systems: the run folder must be on storage all nodes see the same way (already
true for checkpoints). Hard links must be supported (NFS, Lustre, GPFS, BeeGFS, CephFS do;
some object-store FUSE mounts do not, and are reported). If the holder's node is lost while its
job looks alive to nobody, the lock is taken over `stale_after_s` after its last heartbeat;
`train.lock_stale_s` sets it, and deleting LOCK by hand (after checking the job is gone) works
too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from eagle_dist.errors import EagleError

LOCK_NAME = "LOCK"


class RunLockedError(EagleError, RuntimeError):
    """Another live training job holds the run folder."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a recycled pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _pid_running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    current = _pid_start(pid)
    return start is None or current is None or current == start


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = 600.0,
                 slurm_job: str | None = None, elastic_run: str | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = float(stale_after_s)
        self.token = uuid.uuid4().hex
        pid = os.getpid()
        self.record = {
            "host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_namespace": _pid_namespace(),
            "slurm_job_id": slurm_job, "elastic_run_id": elastic_run,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token,
        }
        self.held = False
        self.took_over: dict | None = None  # the stale holder's record, when we replaced one
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquire / release

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError; a stale lock is taken over (see the module)."""
        private = self.path.with_name(f"{LOCK_NAME}.{self.token}")
        try:
            with open(private, "w") as f:
                json.dump(self.record, f)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(5):  # each round either wins, refuses, or removed one stale lock
                if self._link(private):
                    self.held = True
                    self._start_heartbeat()
                    return
                current = self._holder()
                if current is None:
                    continue  # released between our link() and our read: try again
                holder, mtime = current
                now = private.stat().st_mtime
                os.utime(private)  # refresh "now" as the file server sees it, for the next round
                why_stale = self._stale_reason(holder, mtime, now)
                if why_stale is None:
                    raise RunLockedError(self._refusal(holder, mtime, now))
                self._take_over(holder, why_stale)
            raise RunLockedError(f"could not take the lock {self.path}: it keeps changing hands; "
                                 "is another launch starting in the same run folder right now?")
        finally:
            private.unlink(missing_ok=True)

    def _link(self, private: Path) -> bool:
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            # NFS: a retried link whose first reply was lost reports EEXIST although it worked.
            return private.stat().st_nlink == 2
        except OSError as err:
            raise RunLockedError(
                f"cannot create the run lock {self.path} ({err.strerror}): the run folder's file system "
                "must support hard links (local disks, NFS, Lustre, GPFS, BeeGFS and CephFS do)"
            ) from err

    def _holder(self) -> tuple[dict, float] | None:
        """(record, mtime) of the current lock, None if there is none; a record of {} when unreadable."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), mtime

    def _stale_reason(self, holder: dict, mtime: float, now: float) -> str | None:
        """Why the holder is gone, or None if it may be alive."""
        me = self.record
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return f"an earlier run of this Slurm job ({me['slurm_job_id']}, requeued or restarted)"
        if me["elastic_run_id"] and holder.get("elastic_run_id") == me["elastic_run_id"]:
            return "an earlier attempt of this torchrun job (restarted after a failure)"
        same_machine = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_namespace"))
        if same_machine and isinstance(holder.get("pid"), int):
            if holder["pid"] == me["pid"]:
                return "an earlier trainer of this process that was never closed"
            if not _pid_running(holder["pid"], holder.get("pid_start")):
                return f"process {holder['pid']} on this host, which no longer runs"
            return None
        age = now - mtime
        if age > self.stale_after_s:
            return f"a job whose heartbeat stopped {age:.0f} s ago (train.lock_stale_s={self.stale_after_s:.0f})"
        return None

    def _take_over(self, holder: dict, why: str) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another launch moved it first; our next link() decides
        moved = self._read_record(aside)
        if moved.get("token") != holder.get("token"):
            # A faster launch replaced the stale lock with its live one in between: put it back.
            try:
                os.link(aside, self.path)
            finally:
                aside.unlink(missing_ok=True)
            raise RunLockedError(self._refusal(moved, None, None))
        aside.unlink(missing_ok=True)
        self.took_over = {**holder, "why": why}

    @staticmethod
    def _read_record(path: Path) -> dict:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _refusal(self, holder: dict, mtime: float | None, now: float | None) -> str:
        job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        since = f", started {holder['started_at']}" if holder.get("started_at") else ""
        beat = f", last heartbeat {now - mtime:.0f} s ago" if mtime is not None and now is not None else ""
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}{since}{beat}"
               if holder else "an unreadable lock file")
        return (f"run folder {self.path.parent} is in use by another training job ({who}). Two trainers "
                "in one folder would overwrite each other's checkpoints and metrics. Wait for it to "
                "finish or stop it, or choose another train.run_name. If that job is dead, its lock "
                f"is taken over once its heartbeat is train.lock_stale_s={self.stale_after_s:.0f} s old, "
                f"or delete {self.path} after checking.")

    def release(self) -> None:
        """Remove the lock if it is still ours (safe to call twice, and from a forked child)."""
        self._stop.set()
        if not self.held or os.getpid() != self.record["pid"]:
            return
        self.held = False
        if self._read_record(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    # -- heartbeat

    def _start_heartbeat(self) -> None:
        interval = max(1.0, self.stale_after_s / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a transient storage error; the next beat tries again

        self._beat = threading.Thread(target=beat, name="eagle-run-lock-heartbeat", daemon=True)
        self._beat.start()
