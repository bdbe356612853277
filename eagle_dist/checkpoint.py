"""Atomic, self-describing checkpoints: `runs/<name>/checkpoints/step-XXXXXXXX/`.

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=3, dist=d)
    ckpt.save(step, model, optimizer, extra={"step": step, "mlflow_run_id": ..., ...})
    latest = ckpt.latest()                      # newest COMPLETE checkpoint or None
    if latest is not None:
        extra = ckpt.load(latest, model, optimizer)

    python -m eagle_dist.checkpoint runs/<name>/checkpoints    # list what is there

Every rank calls save/latest/load together (they contain collectives).

Layout of one checkpoint:

    step-00000500/
      trainer_state.json      rank 0: format version, step, world size, strategy, `extra`
      model.safetensors       rank 0: full weights of the unwrapped model (portable export)
      optimizer.pt            DDP, rank 0: optimizer.state_dict() (identical on all ranks)
      scheduler.pt            rank 0, when a scheduler is given
      rng/rank-00000.pt ...   every rank: torch / cuda / numpy / python RNG states
      deepspeed/engine/...    DeepSpeed: every rank writes its ZeRO shard (engine.save_checkpoint)
      COMPLETE                rank 0, last, after every rank reported success

Atomicity: all ranks write into `.incomplete-step-XXXXXXXX/`, agree (all-reduce) that every
write succeeded, then rank 0 fsyncs, writes COMPLETE and renames the folder into place. A kill
at any moment leaves either the old set of checkpoints or the new complete one under a final
name; stale `.incomplete-*` folders are removed by the next save. Pruning to `keep_last`
happens only after the new checkpoint is in place and counts only complete checkpoints, so a
failing save (ENOSPC, EIO, quota) never costs the previous one. A failed save raises
`CheckpointSaveError` on every rank with the failing ranks and the OS error.

Why our own files for DDP instead of `accelerator.save_state`: accelerate pickles RNG states
(`random_states_N.pkl`) and loads them with `weights_only=False`. Our files load with
`weights_only=True` throughout: safetensors for weights, plain tensors/dicts for optimizer,
scheduler and RNG states, JSON for the trainer state.

DeepSpeed: the ZeRO shards are written by DeepSpeed's engine (only it knows its partitioning).
DeepSpeed itself loads them with `weights_only=False`; we swap its checkpoint engine's `load`
for a `weights_only=True` load that allows exactly three DeepSpeed classes found in ZeRO
optimizer shards (ZeroStageEnum, LossScaler, fragment_address; see `_DEEPSPEED_SAFE_GLOBALS`).
During save we also route its writes through a wrapper that records an OSError instead of
raising it mid-save, because an exception on one rank inside DeepSpeed's save would leave the
other ranks waiting in its internal barriers; the error is raised after all ranks agree.
Multi-node runs need the checkpoint root on storage shared by all nodes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eagle_dist.errors import EagleError

FORMAT_VERSION = 1
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_DIR = "rng"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "engine"
TMP_PREFIX = ".incomplete-"
TRASH_PREFIX = ".replaced-"
STEP_PREFIX = "step-"
STEP_DIR_RE = re.compile(STEP_PREFIX + r"(\d{8,})")  # step-00001000 (8 digits, more past 10^8)


class CheckpointError(EagleError, RuntimeError):
    """A checkpoint cannot be used (incomplete, foreign, wrong model); the message says why."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed on some rank; the previous checkpoints are untouched."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR_RE.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(ckpt_root: Path) -> Path | None:
    """Newest checkpoint folder that has its completion marker; folders without it are ignored."""
    found = complete_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    """trainer_state.json of a complete checkpoint (format, step, world size, strategy, extra)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} has no {MARKER} marker: it was not fully written (killed or failed during "
            "the save). Use an older checkpoint, or delete this folder."
        )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / STATE_FILE} is missing or unreadable ({err})") from err
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format')!r}; this eagle-dist reads "
            f"format {FORMAT_VERSION}."
        )
    return state


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> dict:
    """This process's RNG states as plain tensors/numbers (loadable with weights_only=True)."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- file helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing from a checkpoint marked complete") from err


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on device ({err})"
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- DeepSpeed


def _deepspeed_safe_globals() -> list:
    # The only non-tensor classes DeepSpeed 0.19 pickles into ZeRO-1/2 checkpoints
    # (found with torch.serialization.get_unsafe_globals_in_checkpoint on real shards).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def _deepspeed_io(engine: Any, errors: list[BaseException]):
    """Route DeepSpeed's checkpoint I/O through error-recording saves and weights_only loads."""
    ce = engine.checkpoint_engine
    original_save, original_makedirs = ce.save, ce.makedirs
    original_copy = getattr(engine, "_copy_recovery_script", None)

    def save(state_dict: Any, path: str) -> None:
        if errors:
            return  # this rank already failed; keep walking DeepSpeed's barriers only
        try:
            original_save(state_dict, path)
        except OSError as err:
            errors.append(err)

    def makedirs(path: str, exist_ok: bool = False) -> None:
        try:
            original_makedirs(path, exist_ok=exist_ok)
        except OSError as err:
            errors.append(err)

    def copy_recovery_script(save_path: str) -> None:
        try:
            original_copy(save_path)
        except OSError as err:
            errors.append(err)

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.save, ce.makedirs, ce.load = save, makedirs, load
    if original_copy is not None:
        engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        # The originals are class methods: dropping the instance attributes restores them.
        for name in ("save", "makedirs", "load"):
            ce.__dict__.pop(name, None)
        engine.__dict__.pop("_copy_recovery_script", None)


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / find / load checkpoints under `root` with keep-last-K pruning.

    `dist` is an `eagle_dist.distributed.Dist` (rank, world size, strategy, collectives, unwrap).
    `interval`: save every this many steps (`should_save`); None: only when asked.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int, dist: Any, interval: int | None = None):
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self.dist = dist
        self.interval = interval

    def should_save(self, step: int) -> bool:
        """Whether `step` is an interval checkpoint (the loop saves the final step by itself)."""
        return bool(self.interval) and step % self.interval == 0

    # -- queries

    def latest(self) -> Path | None:
        """Newest complete checkpoint, as rank 0 sees it (identical answer on every rank)."""
        found = latest_complete(self.root) if self.dist.is_main else None
        found = self.dist.broadcast_object(None if found is None else str(found))
        return None if found is None else Path(found)

    def all(self) -> list[Path]:
        return [p for _, p in complete_checkpoints(self.root)]

    # -- save

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        extra: dict | None = None,
        scheduler: Any = None,
    ) -> Path:
        """Write checkpoint `step` atomically; every rank must call it. Returns its folder.

        `extra` (JSON-serialisable: step, data seed, resolved config, MLflow run id, counters)
        comes back from `load()`. Raises CheckpointSaveError on every rank if any rank failed.
        """
        d = self.dist
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        deepspeed = d.strategy == "deepspeed"
        errors: list[BaseException] = []
        # Every rank checks, so a bad `extra` fails everywhere at once, before any file exists.
        state_text = self._state_json(step, extra)

        if d.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._remove_stale_temps()
                tmp.mkdir()
            except OSError as err:
                errors.append(err)
        # Nobody writes before the folder exists; a rank-0 failure stops everyone here.
        if d.any_flag(bool(errors)):
            self._fail(step, errors, stage="preparing the folder")

        if deepspeed:
            with _deepspeed_io(model, errors):
                model.save_checkpoint(
                    str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state={}, save_latest=False
                )
        try:
            if not errors:
                self._write_own_files(tmp, model, optimizer, scheduler, state_text, deepspeed)
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank together)
            # Any failure here, not just OSError, must reach the agreement below: a rank that
            # raised on its own would leave the others waiting in the next collective.
            errors.append(err)

        if d.any_flag(bool(errors)):
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._fail(step, errors, stage="writing")

        outcome: str | None = None
        if d.is_main:
            try:
                self._commit(tmp, final, step)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                outcome = _describe(err)
        outcome = d.broadcast_object(outcome)
        if outcome is not None:
            raise CheckpointSaveError(
                f"saving checkpoint {final} failed while committing it: {outcome}. "
                f"{self._previous_hint()}"
            )
        if d.is_main:
            self._prune()
        return final

    def _state_json(self, step: int, extra: dict | None) -> str:
        state = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            "zero_stage": self.dist.zero_stage,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "extra": extra or {},
        }
        try:
            return json.dumps(state, indent=1, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint `extra` must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}") from err

    def _write_own_files(
        self, tmp: Path, model: Any, optimizer: Any, scheduler: Any, state_text: str, deepspeed: bool
    ) -> None:
        from safetensors.torch import save_file

        d = self.dist
        _torch_save(capture_rng(), tmp / RNG_DIR / f"rank-{d.rank:05d}.pt")
        if not d.is_main:
            return
        # Copies, not views: DeepSpeed's ZeRO keeps parameters as views into flat buffers (and
        # tied weights share storage), which safetensors refuses to write as they are.
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in d.unwrap(model).state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        _fsync_file(tmp / MODEL_FILE)
        if not deepspeed:
            _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        with open(tmp / STATE_FILE, "w") as f:
            f.write(state_text)
            f.flush()
            os.fsync(f.fileno())

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0, after every rank succeeded: fsync, marker last, rename into place."""
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_file(path)
        marker = {"step": int(step), "world_size": self.dist.world_size, "completed_at": time.time()}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. right after resuming at it): move the old one aside first,
            # so the final name always points at one complete checkpoint.
            trash = self.root / f"{TRASH_PREFIX}{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(trash, final)  # put the old one back rather than lose the step
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)

    def _fail(self, step: int, errors: list[BaseException], stage: str) -> None:
        local = (_describe(errors[0]), isinstance(errors[0], OSError)) if errors else None
        reports = self.dist.gather_object(local)
        failed = "; ".join(f"rank {r}: {rep[0]}" for r, rep in enumerate(reports) if rep is not None)
        storage = any(rep is not None and rep[1] for rep in reports)
        raise CheckpointSaveError(
            f"saving checkpoint {self.root / step_dir_name(step)} failed while {stage} ({failed}). "
            f"{self._previous_hint(storage)}"
        ) from (errors[0] if errors else None)

    def _previous_hint(self, storage: bool = True) -> str:
        previous = latest_complete(self.root)
        kept = f"The previous checkpoint {previous} is intact." if previous else "No earlier checkpoint exists."
        if not storage:
            return kept
        return f"{kept} Free disk space (or fix the storage) under {self.root} and restart to resume."

    def _remove_stale_temps(self) -> None:
        for child in self.root.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in complete_checkpoints(self.root)[: -self.keep_last]:
            # Remove the marker first: a prune killed half-way leaves an ignored folder,
            # never a "complete" one with files missing.
            try:
                (path / MARKER).unlink()
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)

    # -- load

    def load(self, path: str | os.PathLike, model: Any, optimizer: Any = None, scheduler: Any = None) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; return the saved `extra`.

        Every rank must call it. Raises CheckpointError for an incomplete or foreign folder, or
        weights that do not fit the model.
        """
        from safetensors.torch import load_file

        d = self.dist
        path = Path(path)
        state = read_state(path)
        if (state["strategy"] == "deepspeed") != (d.strategy == "deepspeed"):
            raise CheckpointError(
                f"{path} was written by a {state['strategy']} run and this run uses {d.strategy}; "
                "their optimizer states are not interchangeable. Resume with the same strategy "
                f"(its model weights alone are in {path / MODEL_FILE})."
            )
        if d.strategy == "deepspeed":
            errors: list[BaseException] = []
            try:
                with _deepspeed_io(model, errors):
                    loaded, _ = model.load_checkpoint(
                        str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                        load_optimizer_states=optimizer is not None, load_lr_scheduler_states=False,
                    )
            except RuntimeError as err:
                raise CheckpointError(
                    f"DeepSpeed could not restore {path / DEEPSPEED_DIR} into this model ({err}). "
                    "Was the checkpoint written with a different model configuration?"
                ) from err
            if loaded is None:
                raise CheckpointError(f"DeepSpeed found no engine checkpoint in {path / DEEPSPEED_DIR}")
        else:
            try:
                d.unwrap(model).load_state_dict(load_file(str(path / MODEL_FILE), device="cpu"), strict=True)
            except (RuntimeError, FileNotFoundError) as err:
                raise CheckpointError(
                    f"the weights in {path / MODEL_FILE} do not fit this model ({err}). Was the "
                    "checkpoint written with a different model configuration?"
                ) from err
            if optimizer is not None:
                optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE))
        if scheduler is not None:
            scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE))

        rng_file = path / RNG_DIR / f"rank-{d.rank:05d}.pt"
        if state["world_size"] == d.world_size and rng_file.is_file():
            restore_rng(_torch_load(rng_file))
        else:
            d.print(
                f"note: {path} was written by {state['world_size']} process(es), this run has "
                f"{d.world_size}; random streams restart from the seed instead of continuing."
            )
        d.barrier()
        return state["extra"]


def main(argv: list[str] | None = None) -> int:
    """List checkpoints under a folder: step, completeness, world size."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m eagle_dist.checkpoint runs/<name>/checkpoints", file=sys.stderr)
        return 2
    root = Path(args[0])
    if not root.is_dir():
        print(f"no such folder: {root}", file=sys.stderr)
        return 2
    for child in sorted(root.iterdir()):
        if STEP_DIR_RE.fullmatch(child.name):
            if is_complete(child):
                state = read_state(child)
                print(f"{child.name}  complete  world_size={state['world_size']}  strategy={state['strategy']}")
            else:
                print(f"{child.name}  INCOMPLETE (ignored)")
        elif child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            print(f"{child.name}  temporary (removed by the next save)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
