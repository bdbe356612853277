"""Runs the real Trainer under any launcher, optionally with faults, and dumps what the tests compare.

    torchrun --nproc_per_node 2 tests/train_harness.py OUT [key=value ...]
    EAGLE_TEST_FAULTS="save:4:0;step:5:1" \\
        torchrun --max-restarts 2 --nproc_per_node 2 tests/train_harness.py OUT [key=value ...]

Like launch/train.py, plus: every rank writes OUT/rank{R}.pt (its final head weights as the
rank sees them); rank 0 appends one line per attempt to OUT/attempts.jsonl (restart count, the
step it resumed at, the MLflow run id, what the checkpoint folder held at start-up) and writes
OUT/summary.json when training finishes (final summary, MLflow run id, run folder, world size,
strategy).

EAGLE_TEST_FAULTS lists one fault per torchrun attempt (TORCHELASTIC_RESTART_COUNT 0, 1, ...):

    step:K:R   rank R SIGKILLs itself as it starts computing step K (K steps are done)
    save:K:R   rank R SIGKILLs itself while committing the checkpoint of step K: every file
               and the COMPLETE marker are written into `.incomplete-step-K`, the rename into
               place has not happened (only rank 0 commits, so R must be 0)

EAGLE_TEST_SLOW_INTERRUPT_SAVE=FILE makes the checkpoint save that a Ctrl-C asks for touch FILE
and then take a minute, so a test can press Ctrl-C again in the middle of it.

EAGLE_TEST_SLOW_EVAL=FILE makes each evaluation batch take 3 s more and rank 0 touch FILE when
the first one arrives, so a test can signal the job in the middle of an evaluation.

Attempts with no fault listed run clean.  The faults are monkeypatches made here, so the
package carries no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import eagle_dist  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402

from eagle_dist import checkpoint as checkpoint_mod  # noqa: E402
from eagle_dist.config import load_config  # noqa: E402
from eagle_dist.engine import trainer as trainer_mod  # noqa: E402


def _fault_for_this_attempt() -> tuple[str, int, int] | None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = [f for f in os.environ.get("EAGLE_TEST_FAULTS", "").split(";") if f]
    if attempt >= len(faults) or faults[attempt] == "none":
        return None
    kind, step, rank = faults[attempt].split(":")
    if kind not in ("step", "save"):
        raise SystemExit(f"unknown fault kind {kind!r} in EAGLE_TEST_FAULTS")
    return kind, int(step), int(rank)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(kind: str, step: int) -> None:
    if kind == "step":
        original_forward = trainer_mod.Trainer._forward

        def forward(self, batch, at_step):
            if at_step == step:
                _die()
            return original_forward(self, batch, at_step)

        trainer_mod.Trainer._forward = forward
    else:
        original_fsync_dir = checkpoint_mod._fsync_dir
        doomed = f"{checkpoint_mod.TMP_PREFIX}{checkpoint_mod.step_dir_name(step)}"

        def fsync_dir(path):
            # _commit fsyncs the temporary folder right after writing the marker into it.
            if Path(path).name == doomed:
                _die()
            original_fsync_dir(path)

        checkpoint_mod._fsync_dir = fsync_dir


def _slow_interrupt_save(trainer, started: Path) -> None:
    original = checkpoint_mod.CheckpointManager._write_own_files

    def write_own_files(self, tmp, *args, **kwargs):
        if signal.SIGINT in trainer.stop_signals:
            started.touch()
            time.sleep(60)  # a signal handler runs during the sleep
        return original(self, tmp, *args, **kwargs)

    checkpoint_mod.CheckpointManager._write_own_files = write_own_files


def _slow_evaluation(trainer, started: Path) -> None:
    from eagle_dist.evaluation import loop

    original = loop.AgreedBatches.__iter__

    def batches(self):
        for batch in original(self):
            if trainer.dist.is_main:
                started.touch()
            time.sleep(3)  # a signal handler runs during the sleep
            yield batch

    loop.AgreedBatches.__iter__ = batches


def _record_attempt(trainer, out: Path) -> None:
    ckpt_root = trainer.run_dir / "checkpoints"
    record = {
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "start_step": trainer.step,
        "run_id": trainer.tracker.run_id,
        "checkpoint_entries": sorted(p.name for p in ckpt_root.iterdir()),
    }
    with open(out / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    cfg = load_config(REPO / "configs" / "default.yaml", sys.argv[2:])
    trainer = trainer_mod.Trainer(cfg)
    try:
        fault = _fault_for_this_attempt()
        if fault is not None and fault[2] == trainer.dist.rank:
            _inject(fault[0], fault[1])
        if os.environ.get("EAGLE_TEST_SLOW_INTERRUPT_SAVE"):
            _slow_interrupt_save(trainer, Path(os.environ["EAGLE_TEST_SLOW_INTERRUPT_SAVE"]))
        if os.environ.get("EAGLE_TEST_SLOW_EVAL"):
            _slow_evaluation(trainer, Path(os.environ["EAGLE_TEST_SLOW_EVAL"]))
        out.mkdir(parents=True, exist_ok=True)
        if trainer.dist.is_main:
            _record_attempt(trainer, out)
        summary = trainer.train()
        state = {k: v.detach().cpu().clone() for k, v in trainer.raw_heads.state_dict().items()}
        torch.save(state, out / f"rank{trainer.dist.rank}.pt")
        if trainer.dist.is_main:
            (out / "summary.json").write_text(json.dumps({
                "summary": summary,
                "run_id": trainer.tracker.run_id,
                "run_dir": str(trainer.run_dir),
                "world_size": trainer.dist.world_size,
                "strategy": trainer.dist.strategy,
            }, default=float))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
