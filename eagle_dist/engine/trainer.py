"""The training loop: config in, checkpoints, metrics and an evaluation table out.

    from eagle_dist.config import load_config
    from eagle_dist.engine.trainer import Trainer
    trainer = Trainer(load_config("configs/default.yaml"))
    try:
        trainer.train()
    finally:
        trainer.close()

Launch it through ``launch/train.py`` (accelerate or torchrun); see the README for the lines.

Labels are optional: training shards without classes (a folder of photos) switch the run to
``model.n_classes = 0``, where the cluster probe finds ``model.n_clusters`` segments, there is
no linear probe, validation shards are optional and evaluation measures what needs no labels
(``eagle_dist.evaluation.loop.evaluate_unlabeled``).

Steps, not epochs: the stream is endless and every count is in optimizer steps; its segments
and how a resume finds its place in them: eagle_dist.data.prepare.

Stopping early (preemption, faults).  SIGUSR1 and SIGTERM only set a flag; at the next step
boundary (or after the running batch of an evaluation, which then ends early) all ranks agree on
it with one all-reduce, save a checkpoint and return, and launch/train.py exits 0 (a clean exit,
so torchrun's --max-restarts does not restart the workers).  Slurm and `kill -- -PGID` signal
every process, the DataLoader workers too: they ignore the stop signals
(eagle_dist.data.stream.shield_worker_from_stop_signals), and torchrun started through
eagle_dist.distributed.run_torchrun (launch/torchrun.py, the embedded default's relaunch) only
passes them on to the workers.  SIGUSR1 is the pre-timeout signal launch/slurm/train.sbatch asks Slurm for: after
the save, rank 0 runs `scontrol requeue $SLURM_JOB_ID` (eagle_dist.distributed.requeue_slurm_job) and the
requeued job resumes from that checkpoint with the same run folder and MLflow run.  SIGTERM
saves and exits without requeueing: `scancel` sends SIGTERM, and a job that requeues itself
on SIGTERM comes back after every scancel; Slurm's own preemption
with PreemptMode=REQUEUE requeues the job by itself.  A DataError from any rank's stream
(shards that yield nothing usable) and NaN/Inf losses in `train.max_bad_steps` steps in a row
stop every rank with a checkpoint and one message.  Ctrl-C (SIGINT) stops like SIGTERM; a
second one more than SIGINT_REPEAT_S later (or a SIGTERM after it, which is how a plain
torchrun passes a second Ctrl-C on) exits at once with status 130.  An eigensolver that does not
converge is retried with the float64 decomposition, then the step is skipped and counted like a
NaN loss.  Rank 0 holds the run folder's LOCK (eagle_dist/engine/runlock.py) for the whole run.  Corrupt or truncated shard members are
skipped by the stream; the running totals are logged as `data/*` metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path

import torch

from eagle_dist import config as config_mod
from eagle_dist.config import Config
from eagle_dist.data.prepare import SKIP_FIELDS, TrainingStream, prepare_training_data
from eagle_dist.data.stream import finish_batch
from eagle_dist.distributed import requeue_slurm_job, slurm_job_id
from eagle_dist.engine.step import run_step
from eagle_dist.errors import EagleError
from eagle_dist.method.eagle import EagleHeads, build_model, build_optimizer, loss_names, momentum, training_step_losses

if typing.TYPE_CHECKING:
    from eagle_dist.engine.runlock import RunLock


class TrainingError(EagleError, RuntimeError):
    """A failure the user must act on (bad data, diverged loss, ...)."""


# The signals that stop training with a checkpoint, in the order they win when several arrive.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
# A second SIGINT sooner than this after the first is taken as the same Ctrl-C: a launcher that
# forwards SIGINT to workers still in the terminal's process group delivers each press twice.
SIGINT_REPEAT_S = 1.0


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Trainer:
    def __init__(self, cfg: Config):
        from eagle_dist import distributed as dist_mod

        self.cfg = cfg
        self.dist = dist_mod.setup(
            strategy=cfg.dist.strategy,
            zero_stage=cfg.dist.zero_stage,
            mixed_precision=cfg.dist.mixed_precision,
            grad_clip=cfg.optim.grad_clip,
            expected_world_size=cfg.dist.expected_world_size,
            seed=cfg.train.seed,
            cpu_threads=cfg.dist.cpu_threads,
            micro_batch_size=cfg.data.batch_size,
            cpu_allocator=cfg.dist.cpu_allocator,
        )
        self.device = self.dist.device
        self.run_lock: RunLock | None = None  # rank 0's, once _lock_run_dir took it
        self.run_dir = self._run_dir()
        self.max_steps = config_mod.step_batches(cfg.train.step_unit, cfg.train.max_steps)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        self.step = 0
        self.bad_steps = 0
        self._bad_eigen_steps = 0  # of the bad steps in a row, how many were eigensolver failures
        self._eig_failed = False
        self.skipped_steps = 0
        self.stop_signal: str | None = None  # "SIGUSR1" / "SIGTERM" once the ranks agreed to stop
        self._start_step = 0
        self.outcome = "FINISHED"  # the MLflow run's final status (close() sets it)
        self._skips_before = dict.fromkeys(SKIP_FIELDS, 0)  # all ranks, runs before a resume
        self._skips_reported = 0
        self._install_signal_handlers()

        try:
            with self._outcome_recorded():
                self._lock_run_dir()
                self.manifest, self.eval_shards = prepare_training_data(cfg, self.dist)
                self.stream = TrainingStream(cfg, self.dist)
                self._build_model()
                self._resume_or_start()
        except BaseException:
            # launch/train.py only closes a trainer it got back: tear the process group (and a
            # started MLflow run) down here, or a bad shard folder leaves other ranks hanging.
            self.close()
            raise

    @contextlib.contextmanager
    def _outcome_recorded(self):
        """An error marks the MLflow run FAILED (Ctrl-C: KILLED) when close() ends it."""
        try:
            yield
        except KeyboardInterrupt:
            self.outcome = "KILLED"
            raise
        except BaseException:
            self.outcome = "FAILED"
            raise

    # ------------------------------------------------------------------ set-up

    def _run_dir(self) -> Path:
        name = self.cfg.train.run_name
        job = slurm_job_id()
        if job and self.cfg.train.job_id_in_run_name and not name.endswith(job):
            name = f"{name}-{job}"  # requeued jobs keep their id, so they find their checkpoints
        run_dir = Path(self.cfg.train.output_dir) / name
        if self.dist.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        return run_dir

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run folder's LOCK before anything is read or written there; a refusal
        (another live job trains into this folder) is raised on every rank together."""
        from eagle_dist.distributed import elastic_run_id
        from eagle_dist.engine.runlock import RunLock, RunLockedError

        refusal, took_over = None, None
        if self.dist.is_main:
            lock = RunLock(self.run_dir, self.cfg.train.lock_stale_s, slurm_job_id(), elastic_run_id())
            try:
                lock.acquire()
                self.run_lock, took_over = lock, lock.took_over
            except RunLockedError as err:
                refusal = str(err)
        refusal = self.dist.broadcast_object(refusal)
        if refusal is not None:
            raise RunLockedError(refusal)
        if took_over is not None:
            self.dist.print(f"took over the run lock of {took_over['why']}")

    def _install_signal_handlers(self) -> None:
        # Preemption (SLURM's pre-timeout signal), SIGTERM and a first Ctrl-C only set a flag; all
        # ranks agree on it at the next step boundary, save, and exit cleanly.
        owner = os.getpid()
        self.stop_signals: set[int] = set()
        self._first_sigint: float | None = None  # monotonic time of the first Ctrl-C

        def handler(signum, _frame):
            # After a Ctrl-C, a SIGTERM is a launcher giving up waiting (plain torchrun sends one
            # on a second Ctrl-C): stop at once, as for a second Ctrl-C.
            if self._first_sigint is not None and os.getpid() == owner and signum == signal.SIGTERM:
                self._stop_at_once()
            self.stop_signals.add(signum)

        def on_sigint(signum, _frame):
            if os.getpid() != owner:
                return  # a forked DataLoader worker: the trainer process decides for it
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
                self.stop_signals.add(signum)
                # os.write, not print: print from a handler can hit a half-done print (reentrant).
                if self.dist.is_main:
                    os.write(2, b"eagle-dist: Ctrl-C: stopping after this step with a checkpoint "
                                b"(Ctrl-C again to stop at once without saving)\n")
            elif now - self._first_sigint > SIGINT_REPEAT_S:
                self._stop_at_once()

        for sig, fn in ((signal.SIGUSR1, handler), (signal.SIGTERM, handler), (signal.SIGINT, on_sigint)):
            try:
                signal.signal(sig, fn)
            except ValueError:  # not the main thread (e.g. inside some test harnesses)
                pass

    def _stop_at_once(self) -> None:
        """Second Ctrl-C: exit now. A save in progress stays an `.incomplete-*` folder (resume
        ignores it; the next save removes it): a checkpoint is only ever complete or absent."""
        if self.dist.is_main:
            os.write(2, (f"eagle-dist: second Ctrl-C: stopped at once at step {self.step} without saving; "
                         f"the complete checkpoints in {self.run_dir / 'checkpoints'} are intact: start the "
                         "same command again to resume from the newest\n").encode())
        if self.run_lock is not None:
            self.run_lock.release()
        os._exit(130)  # 128 + SIGINT, what a shell reports for a Ctrl-C

    def _build_model(self) -> None:
        cfg = self.cfg
        # The random-init warning once per job, not once per rank.
        self.backbone, heads = build_model(cfg, self.device, quiet=not self.dist.is_main, say=self.dist.print)
        optimizer = build_optimizer(heads, cfg.optim, self.global_batch)
        self.heads, self.optimizer = self.dist.prepare(heads, optimizer)
        # Per-rank randomness (dropout masks, correspondence samples) after the shared init.
        torch.manual_seed(cfg.train.seed + 1000 * (self.dist.rank + 1))

    @property
    def raw_heads(self) -> EagleHeads:
        # Dist is untyped (accelerate's unwrap_model returns nn.Module); these are the heads.
        return typing.cast(EagleHeads, self.dist.unwrap(self.heads))

    def _resume_or_start(self) -> None:
        from eagle_dist.checkpoint import CheckpointManager
        from eagle_dist.engine.tracking import make_tracker

        cfg = self.cfg
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last, self.dist,
                                      interval=cfg.train.ckpt_interval)
        run_id = None
        latest = self.ckpt.latest() if cfg.train.resume else None
        if cfg.train.resume:
            self._report_unfinished_checkpoints()
        if latest is not None:
            extra = self.ckpt.load(latest, self.heads, self.optimizer, verify=False)  # latest() verified it
            self.step = int(extra["step"])
            self.skipped_steps = int(extra.get("skipped_steps", 0))
            self._skips_before.update(extra.get("data_skips", {}))
            run_id = extra.get("mlflow_run_id")
            self.dist.print(f"resumed from {latest} at step {self.step}")
        self.tracker = make_tracker(
            self.dist.is_main, self.run_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment
        )
        self.tracker.start(
            run_name=self.run_dir.name, params=config_mod.flatten(self._public_config()), run_id=run_id,
            parent_run_id=cfg.tracking.parent_run_id,
        )
        if self.dist.is_main:
            config_mod.save_yaml(config_mod.from_dict(self._public_config()), self.run_dir / "config.yaml")
            self.tracker.log_artifact(self.run_dir / "config.yaml")

    def _public_config(self) -> dict:
        """The resolved config with credentials in tracking.uri masked: it goes to MLflow, to
        config.yaml and into checkpoints (pass credentials as MLFLOW_TRACKING_USERNAME /
        MLFLOW_TRACKING_PASSWORD instead of in the URI)."""
        from eagle_dist.engine.tracking import mask_uri

        data = config_mod.to_dict(self.cfg)
        if data["tracking"].get("uri"):
            data["tracking"]["uri"] = mask_uri(data["tracking"]["uri"])
        return data

    def _report_unfinished_checkpoints(self) -> None:
        """Say which checkpoint folders the resume ignores because their save never finished."""
        from eagle_dist.checkpoint import MARKER, STEP_PREFIX, TMP_PREFIX, is_complete

        root = self.run_dir / "checkpoints"
        if not self.dist.is_main or not root.is_dir():
            return
        # A temporary folder is unfinished even with its marker: the rename is the commit.
        unfinished = sorted(p.name for p in root.iterdir() if p.is_dir() and (
            p.name.startswith(TMP_PREFIX) or (p.name.startswith(STEP_PREFIX) and not is_complete(p))))
        if unfinished:
            self.dist.print(
                f"ignoring unfinished checkpoint folder(s) in {root}: {', '.join(unfinished)} (their save "
                f"did not finish: no {MARKER} marker, or never renamed into place); resuming from the "
                "newest complete checkpoint, if any"
            )

    # ------------------------------------------------------------------ data

    def _data_skips(self) -> dict[str, int]:
        """Samples the stream skipped so far, summed over ranks (a collective: call it on all).

        A resume re-reads (and re-counts) the part of a segment consumed before a mid-segment
        save; interval checkpoints sit on segment boundaries, so only signal stops do that.
        """
        mine = self.stream.local_skips()
        local = torch.tensor([float(mine[key]) for key in SKIP_FIELDS], dtype=torch.float64, device=self.device)
        total = self.dist.all_reduce_sum(local).tolist()
        return {key: int(self._skips_before.get(key, 0)) + int(v) for key, v in zip(SKIP_FIELDS, total)}

    def _report_data_skips(self, skips: dict[str, int]) -> None:
        count = sum(skips.values())
        if count > self._skips_reported:
            self._skips_reported = count
            self.dist.print(
                f"data: {skips['corrupt_samples']} corrupt, {skips['incomplete_samples']} incomplete and "
                f"{skips['missing_samples']} missing samples (truncated shards), {skips['read_errors']} read "
                "errors skipped so far; training goes on. The warnings above name the shards; rebuild "
                "them with `python -m eagle_dist.shard` (it resumes)."
            )

    # ------------------------------------------------------------------ one step

    def _forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """The losses; an eigensolver failure (non-convergence on a degenerate Laplacian) is
        retried with the float64 decomposition, and if that fails too the step's loss is NaN on
        this rank, so the step's all-reduce skips the update everywhere and counts it as bad."""
        self._eig_failed = False
        u = momentum(self.cfg.loss, step, self.cfg.train.step_unit)
        try:
            return training_step_losses(self.backbone, self.heads, batch, u, precision=self.dist.precision)
        except torch.linalg.LinAlgError as err:
            first = err
        if self.cfg.eicue.solver != "eigh64":
            try:
                with self.raw_heads.spectral.using_solver("eigh64"):
                    out = training_step_losses(self.backbone, self.heads, batch, u, precision=self.dist.precision)
                print(f"eagle-dist: step {step}, rank {self.dist.rank}: the {self.cfg.eicue.solver} eigensolver "
                      f"failed ({_first_line(first)}); the float64 retry succeeded", file=sys.stderr, flush=True)
                return out
            except torch.linalg.LinAlgError as err:
                first = err
        print(f"eagle-dist: step {step}, rank {self.dist.rank}: the eigensolver failed even in float64 "
              f"({_first_line(first)}); the step is skipped", file=sys.stderr, flush=True)
        self._eig_failed = True
        nan = torch.full((), float("nan"), device=self.device)
        return {name: nan for name in loss_names(self.cfg.model)}

    def train_step(self, batch: dict | None, data_error: Exception | None = None) -> dict[str, float]:
        """One optimizer step on this rank's `batch`; returns the metrics averaged over ranks.

        batch=None (with the `data_error`): this rank's stream failed; every rank stops, with a
        checkpoint if this run trained, and raises TrainingError.  A NaN/Inf loss on any rank
        skips the update; `train.max_bad_steps` of them in a row raise TrainingError (after a
        checkpoint).  A stop signal seen on any rank sets `self.stop_signal` once the step is done.
        """
        if batch is not None:
            batch = finish_batch(self.dist.to_device(batch))  # normalise and blur on the device
        result = run_step(
            self.dist, self.heads, self.optimizer, self._forward, batch, step=self.step,
            metric_names=loss_names(self.cfg.model),
            grad_clip=self.cfg.optim.grad_clip,
            # Which failure made a step bad travels in the same all-reduce as the stop signals.
            flags=lambda: {**self._stop_flags(), "eigensolver_failed": self._eig_failed},
        )
        if result.missing_batch:
            self._stop_for_data_error(data_error)
        if result.nonfinite:
            self._count_bad_step(eigensolver=result.flags["eigensolver_failed"])
        else:
            self.bad_steps = self._bad_eigen_steps = 0
        self.step += 1
        self._agree_on_stop(result.flags)
        return {**result.metrics, "skipped_steps": self.skipped_steps}

    def _stop_flags(self) -> dict[str, bool]:
        """This rank's stop signals, as flags for a vote of the ranks."""
        return {name: getattr(signal, name) in self.stop_signals for name in STOP_SIGNALS}

    def _agree_on_stop(self, agreed: dict[str, bool]) -> None:
        # SIGTERM and Ctrl-C win over SIGUSR1: they must never requeue (see the module docstring).
        self.stop_signal = next((name for name in STOP_SIGNALS if agreed.get(name)), None)

    def _stop_for_data_error(self, data_error: Exception | None) -> None:
        saved = ""
        if self.step > self._start_step:  # keep what this run trained
            self._save(reason="data error")
            saved = f"; saved a checkpoint in {self.ckpt.root}"
        reason = str(data_error) if data_error is not None else "the data stream failed on another rank"
        raise TrainingError(f"{reason}\nStopped at step {self.step}{saved}.")

    def _count_bad_step(self, eigensolver: bool) -> None:
        self.skipped_steps += 1
        self.bad_steps += 1
        self._bad_eigen_steps = self._bad_eigen_steps + 1 if eigensolver else 0
        what = "the eigensolver failed" if eigensolver else "non-finite loss"
        self.dist.print(f"step {self.step}: {what} on some rank, update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            self._save(reason="diverged")
            if self._bad_eigen_steps == self.bad_steps:
                cause = (f"the eigensolver did not converge, even in float64, for {self.bad_steps} steps in a "
                         f"row (at step {self.step}): the affinity graphs are degenerate, most likely constant "
                         "or blank images, or features that collapsed (check the data and lower the learning "
                         "rates)")
            else:
                cause = (f"the loss was NaN/Inf for {self.bad_steps} steps in a row (at step {self.step}), "
                         "most likely a diverged loss or non-finite features (lower the learning rates or "
                         "check the data)")
            raise TrainingError(f"{cause}; saved a checkpoint in {self.ckpt.root}.")

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        """Steps until `train.max_steps` (or a stop signal); the final evaluation and checkpoint."""
        with self._outcome_recorded():
            return self._loop()

    def _loop(self) -> dict:
        from eagle_dist.data.stream import DataError

        d = self.dist
        d.print(
            f"world size {d.world_size} ({d.strategy}, {d.backend}, {self.device}); mixed precision "
            f"{d.precision}; batch "
            f"{self.cfg.data.batch_size} per rank, global batch {self.global_batch}; "
            f"{self.max_steps} steps; run folder {self.run_dir}"
        )
        batches = self.stream.batches(self.step)
        self.heads.train()
        self._start_step = self.step
        self._clock = (time.perf_counter(), self.step)  # (time, step) of the last log line
        t_start = time.perf_counter()
        while self.step < self.max_steps:
            batch, data_error = None, None
            try:
                batch = next(batches)
            except DataError as err:
                data_error = err
            metrics = self.train_step(batch, data_error)
            self._after_step(metrics)  # an evaluation it runs may end early on a stop signal
            if self.stop_signal is not None:
                # Stop the DataLoader workers before the save (they leave when told to).
                batches.close()
                self._stop_for_signal()
                return {}

        wall = time.perf_counter() - t_start
        last_eval = self.evaluate(final=True)
        if self.stop_signal is not None:  # the resume runs the final evaluation again
            self._stop_for_signal()
            return {}
        self._save(reason="final")
        summary = {
            "steps": self.step,
            "trained_steps_this_run": self.step - self._start_step,
            "wall_s": wall,
            "images_per_s": (self.step - self._start_step) * self.global_batch / max(wall, 1e-9),
            **last_eval,
        }
        self.tracker.log_metrics({"final/wall_s": wall}, step=self.step)
        self._final_artifacts()
        return summary

    def _after_step(self, metrics: dict[str, float]) -> None:
        """Logging, evaluation and interval checkpoints, each at its own interval; after a stop
        signal only the logging (the step was taken: the resume starts after it)."""
        if self.step % self.cfg.train.log_interval == 0 or self.step == self.max_steps:
            self._log(metrics)
        if self.stop_signal is not None:
            return
        if self.step % self.cfg.train.eval_interval == 0 and self.step < self.max_steps:
            self.evaluate()
            self.heads.train()
        if self.stop_signal is None and self.ckpt.should_save(self.step) and self.step < self.max_steps:
            self._save(reason="interval")

    def _log(self, metrics: dict[str, float]) -> None:
        now, (t_last, step_last) = time.perf_counter(), self._clock
        step_time = (now - t_last) / max(1, self.step - step_last)
        metrics = {
            **metrics,
            "step_time_s": step_time,
            "images_per_s": self.global_batch / step_time,
            "lr_seg_head": self.optimizer.param_groups[0]["lr"],
        }
        skips = self._data_skips()
        metrics.update({f"data/{key}": value for key, value in skips.items()})
        self.tracker.log_metrics(metrics, step=self.step)
        eta = (self.max_steps - self.step) * step_time
        self.dist.print(
            f"step {self.step:>7}/{self.max_steps}  loss {metrics['loss']:.4f}  "
            f"{metrics['images_per_s']:.1f} img/s  eta {eta / 60:.1f} min"
        )
        self._clock = (now, self.step)
        self._report_data_skips(skips)

    def _stop_for_signal(self) -> None:
        """Every rank: checkpoint, then (SIGUSR1 under Slurm) rank 0 requeues the job."""
        stop_signal = self.stop_signal
        assert stop_signal is not None  # only called once the ranks agreed on one
        requeue = stop_signal == "SIGUSR1"
        interrupted = stop_signal == "SIGINT"
        self._save(reason="interrupted" if interrupted else "preemption")
        self.outcome = "KILLED"  # not FINISHED: a resume sets the same MLflow run RUNNING again
        d = self.dist
        what = {"SIGUSR1": "SIGUSR1 (Slurm's pre-timeout signal)", "SIGINT": "Ctrl-C (SIGINT)"}.get(
            stop_signal, stop_signal)
        saved = f"stop requested by {what}: saved step {self.step} in {self.ckpt.root}"
        job = slurm_job_id()
        if not requeue or job is None:
            d.print(f"{saved}; exiting cleanly, start the same command again to resume from this checkpoint")
            return
        d.print(saved)
        if d.is_main:
            problem = requeue_slurm_job(job)
            if problem is None:
                print(f"requeued Slurm job {job}; it resumes from step {self.step} when it starts again", flush=True)
            else:
                print(f"eagle-dist: could not requeue Slurm job {job} ({problem}). The checkpoint is saved: "
                      "submit the same sbatch line again (or `scontrol requeue "
                      f"{job}`) to resume.", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, final: bool = False) -> dict:
        """In-training validation (no flip, no CRF, hard assignment).

        The final one also scores k-means on the raw backbone keys of the same images, so the
        table shows what training added over the frozen features.  A stop signal ends it after
        the running batch (the ranks vote after each one): it then sets `stop_signal`, logs
        nothing and returns {}.
        """
        from eagle_dist.evaluation.loop import EvalResult, UnlabeledEvalResult, evaluate_stream, evaluate_unlabeled

        cfg = self.cfg
        # Evaluation must not shift the training randomness (dropout, correspondence samples;
        # loader start-up draws a seed): a run that evaluates more often trains identically.
        result: EvalResult | UnlabeledEvalResult
        with torch.random.fork_rng(devices=[]):
            if cfg.model.unlabeled:
                result = evaluate_unlabeled(self.backbone, self.raw_heads, self.dist, cfg.data, shards=self.eval_shards,
                                            max_batches=cfg.eval.max_batches, seed=cfg.train.seed,
                                            stop_flags=self._stop_flags)
            else:
                result = evaluate_stream(  # in-training protocol: no flip TTA, no CRF
                    self.backbone, self.raw_heads, self.dist, cfg.data, dataclasses.replace(cfg.eval, flip=False),
                    kmeans_baseline=final, shards=self.eval_shards, seed=cfg.train.seed, stop_flags=self._stop_flags,
                )
        if result.stopped_by:
            self._agree_on_stop(result.stopped_by)
            return {}
        metrics = {f"eval/{k}": v for k, v in result.scalars().items()}
        self.tracker.log_metrics(metrics, step=self.step)
        self.last_eval_result = result
        if self.dist.is_main:
            self.dist.print(result.table(title=f"evaluation at step {self.step}"))
            if cfg.model.unlabeled:  # no scores to read without labels: the pictures are the check
                result.write_figures(self.run_dir / "figures")
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _save(self, reason: str) -> None:
        extra = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data_skips": self._data_skips(),
            "data_seed": self.cfg.train.seed,
            "config": self._public_config(),
            "mlflow_run_id": self.tracker.run_id,
            "reason": reason,
        }
        path = self.ckpt.save(self.step, self.heads, self.optimizer, extra)
        self.tracker.log_metrics({"checkpoint_step": self.step}, step=self.step)
        if path is not None:
            self.dist.print(f"checkpoint ({reason}) written: {path}")

    def _final_artifacts(self) -> None:
        if not self.dist.is_main:
            return
        weights = self.run_dir / "final_heads.pt"
        torch.save(self.raw_heads.state_dict(), weights)
        self.tracker.log_artifact(weights)
        result = getattr(self, "last_eval_result", None)
        if result is not None:
            for path in result.write_figures(self.run_dir / "figures"):
                self.tracker.log_artifact(path, artifact_path="figures")

    def close(self) -> None:
        """End the MLflow run with `self.outcome` and tear the process group down."""
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.close(status=self.outcome)
        if self.run_lock is not None:
            self.run_lock.release()
        self.dist.cleanup()


def format_final_table(summary: dict, run_dir: Path, tracking_uri: str) -> str:
    """The short table printed at the end of a run (rank 0)."""
    def cell(key: str) -> str:
        value = summary.get(f"eval/{key}")
        return f"{value:7.2f}" if isinstance(value, float) and math.isfinite(value) else "      -"

    rows = [("cluster probe (trained head)", "cluster"), ("linear probe", "linear"),
            ("k-means on raw backbone keys", "kmeans_raw")]
    lines = [
        "",
        f"final results: {summary['steps']} steps, {summary['wall_s'] / 60:.1f} min, "
        f"{summary['images_per_s']:.1f} images/s",
    ]
    if any(f"eval/{key}_official_mIoU" in summary for _, key in rows):  # scored against labels
        lines += [f"{'':<30}{'official':>16}{'strict':>16}", f"{'':<30}{'mIoU':>8}{'acc':>8}{'mIoU':>8}{'acc':>8}"]
    for title, key in rows:
        if f"eval/{key}_official_mIoU" in summary:
            lines.append(
                f"{title:<30} {cell(key + '_official_mIoU')}{cell(key + '_official_acc')}"
                f"{cell(key + '_strict_mIoU')}{cell(key + '_strict_acc')}"
            )
    if "eval/segments_used" in summary:  # a run without labels
        lines.append(f"segments used {summary['eval/segments_used']:.0f} of {summary['eval/segments']:.0f} (effective "
                     f"{summary['eval/effective_segments']:.1f}); EiCue agreement between the two views "
                     f"{100 * summary['eval/eicue_agreement']:.1f} %; figures in {run_dir / 'figures'}")
    dropped, total = summary.get("eval/official_dropped_pixels"), summary.get("eval/labelled_pixels")
    if dropped is not None and total:
        lines.append(f"(the official protocol ignored {100 * dropped / total:.1f} % of labelled pixels: "
                     "predicted as extra clusters)")
    lines.append(f"run folder: {run_dir}")
    lines.append(f"MLflow: {tracking_uri}")
    lines.append(f"  open it with: mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
