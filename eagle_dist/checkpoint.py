"""Atomic, self-describing checkpoints: `runs/<name>/checkpoints/step-XXXXXXXX/`.

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=3, dist=d)
    ckpt.save(step, model, optimizer, extra={"step": step, "mlflow_run_id": ..., ...})
    latest = ckpt.latest()                      # newest COMPLETE checkpoint or None
    if latest is not None:
        extra = ckpt.load(latest, model, optimizer)

    eagle-dist checkpoint runs/<name>/checkpoints          # list what is there (eagle_dist.cli.checkpoint)
    python -m eagle_dist.checkpoint verify runs/<name>     # check every file's digest; exit 1 if damaged

Every rank calls save/latest/load together (they contain collectives).

Layout of one checkpoint:

    step-00000500/
      trainer_state.json      rank 0: format version, step, world size, strategy, `extra`
      model.safetensors       rank 0: full weights of the unwrapped model (portable export)
      optimizer.pt            DDP, rank 0: optimizer.state_dict() (identical on all ranks)
      scheduler.pt            rank 0, when a scheduler is given
      rng/rank-00000.pt ...   every rank: torch / cuda / numpy / python RNG states
      deepspeed/engine/...    DeepSpeed: every rank writes its ZeRO shard (engine.save_checkpoint)
      COMPLETE                rank 0, last, after every rank reported success: JSON with
                              the size and sha256 of every other file in the folder

Atomicity: all ranks write into `.incomplete-step-XXXXXXXX/`, agree (all-reduce) that every
write succeeded, then rank 0 fsyncs, writes COMPLETE and renames the folder into place. A kill
at any moment leaves either the old set of checkpoints or the new complete one under a final
name; stale `.incomplete-*` folders are removed by the next save. Pruning to `keep_last`
happens only after the new checkpoint is in place and counts only complete checkpoints, so a
failing save (ENOSPC, EIO, quota) never costs the previous one. A failed save raises
`CheckpointSaveError` on every rank with the failing ranks and the OS error.

Integrity: a complete checkpoint can still be damaged afterwards (a truncated copy, a bad disk,
bytes altered on the way to shared storage). `latest()` and `load()` compare every file with the
sizes and sha256 digests in COMPLETE. `latest()` (resume) reports a checkpoint that fails (name,
file, reason), moves it aside to `damaged-step-XXXXXXXX` (never deleted; listing, pruning and
resume skip that name) and falls back to the newest one that verifies; `load()` of a named
checkpoint refuses it with CheckpointDamagedError. Sizes are compared first, so a truncated file
costs nothing to find. Cost: every rank hashes about 1/world_size of the bytes (largest files
dealt round-robin), once at save (from the page cache, right after writing) and once at resume.
sha256 ran at ~0.5 GB/s per core on this project's shared 2-core CPU machine (8 MiB chunks;
hashlib with SHA-NI reaches 1.5-2 GB/s on an idle core), so a 4 GB ZeRO checkpoint over 8
ranks adds about a second each way; storage reads usually dominate. Checkpoints saved before
digests were recorded load unchecked with one note per process.

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
import hashlib
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
DAMAGED_PREFIX = "damaged-"  # visible on purpose: these are kept for the user to look at
DIGEST = "sha256"
_CHUNK = 8 << 20


class CheckpointError(EagleError, RuntimeError):
    """A checkpoint cannot be used (incomplete, foreign, wrong model); the message says why."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed on some rank; the previous checkpoints are untouched."""


class CheckpointDamagedError(CheckpointError):
    """A complete checkpoint whose files no longer match what was recorded when it was saved."""


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


# ----------------------------------------------------------------------------- integrity


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks (constant memory for multi-GB shards)."""
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the marker, as sorted POSIX relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MARKER)


def _share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's part of the files to hash: largest first, dealt round-robin, so N ranks hash
    about 1/N of the bytes each (a DeepSpeed checkpoint has one large shard per rank)."""
    ordered = sorted(sizes, key=lambda name: (-sizes[name], name))
    return ordered[rank::world_size]


def _digest_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"size": (folder / name).stat().st_size, DIGEST: file_digest(folder / name)} for name in names}


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of a checkpoint; a marker that is not a JSON object means damage."""
    marker_path = Path(path) / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MARKER} marker: it was not fully written") from None
    except (OSError, ValueError) as err:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {MARKER}: unreadable ({err})") from err
    if not isinstance(marker, dict):
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {MARKER}: not a JSON object")
    return marker


def _recorded_files(path: Path) -> dict[str, dict] | None:
    """The marker's {file: {size, sha256}} record; None (with a note once) for a checkpoint saved
    before digests were recorded. A malformed record is damage."""
    recorded = read_marker(path).get("files")
    if recorded is None:
        _warn_no_digests(path)
        return None
    if not isinstance(recorded, dict) or not all(
            isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get(DIGEST), str)
            for rec in recorded.values()):
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {MARKER}: its file list is malformed")
    return recorded


def _check_files(folder: Path, recorded: dict[str, dict], names: list[str]) -> str | None:
    """The first problem with `names` (relative paths) against the marker's record, or None.

    Sizes are compared for every name before any byte is hashed: a truncated copy, the common
    damage, is reported without reading gigabytes.
    """
    for name in names:
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name}: missing"
        except OSError as err:
            return f"{name}: unreadable ({_describe(err)})"
        if size != recorded[name]["size"]:
            return f"{name}: {size} bytes, the save recorded {recorded[name]['size']} (truncated or overwritten)"
    for name in names:
        try:
            digest = file_digest(folder / name)
        except OSError as err:
            return f"{name}: unreadable ({_describe(err)})"
        if digest != recorded[name][DIGEST]:
            return f"{name}: {DIGEST} differs from the one recorded at save time (its bytes changed after the save)"
    return None


_warned_legacy: set[str] = set()


def _warn_no_digests(path: Path) -> None:
    # Once per process: a run resumed from an old checkpoint should not repeat this every save.
    if not _warned_legacy:
        print(f"eagle-dist: note: {path} was saved before checkpoints recorded {DIGEST} digests; it is "
              "loaded without an integrity check (checkpoints written from now on carry them)",
              file=sys.stderr, flush=True)
    _warned_legacy.add(str(path))


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check every file of one complete checkpoint against its marker (one process).

    Returns True if it verified, False if it predates digests (loaded unchecked, with a note
    once per process); raises CheckpointDamagedError naming the checkpoint, the file and why,
    or CheckpointError for a folder that is not a complete checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    recorded = _recorded_files(path)
    if recorded is None:
        return False
    problem = _check_files(path, recorded, sorted(recorded))
    if problem is not None:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {problem}")
    return True


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `damaged-step-XXXXXXXX[-N]` next to it; never deletes.

    The new name does not match the step pattern, so resume, listing and pruning skip it.
    """
    path = Path(path)
    for n in range(1000):
        target = path.parent / (f"{DAMAGED_PREFIX}{path.name}" + (f"-{n}" if n else ""))
        if not target.exists():
            os.replace(path, target)
            return target
    raise OSError(errno.EEXIST, "too many damaged copies of this step already", str(path))


# ----------------------------------------------------------------------------- RNG states


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state in a form `torch.load(weights_only=True)` reads back.

    `np.random.get_state()` returns a 5-tuple only while the global generator is the default
    MT19937; after `np.random.set_bit_generator(...)` (numpy >= 1.25) it returns a dict, and
    unpacking that dict as a tuple made every checkpoint save fail. MT19937 keeps the format
    older checkpoints have; any other generator is kept as JSON text (its states hold
    integers wider than 64 bits and small arrays, which plain tensors cannot carry).
    """
    full = np.random.get_state(legacy=False)
    if full["bit_generator"] == "MT19937":
        return {
            "name": "MT19937",
            "key": torch.from_numpy(np.asarray(full["state"]["key"]).astype(np.int64)),
            "pos": int(full["state"]["pos"]),
            "has_gauss": int(full["has_gauss"]),
            "gauss": float(full["gauss"]),
        }

    def encode(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot record a {type(value).__name__} of the numpy RNG state")

    return {"name": str(full["bit_generator"]), "state_json": json.dumps(full, default=encode)}


def _restore_numpy_rng(n: dict) -> None:
    if "state_json" not in n:  # MT19937, the format every checkpoint before this one has
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        return

    def decode(obj: dict) -> Any:
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return obj

    # The global generator must be the same kind again (numpy names it if not): the run that
    # chose it at start-up chooses it again before resuming.
    np.random.set_state(json.loads(n["state_json"], object_hook=decode))


def capture_rng() -> dict:
    """This process's RNG states as plain tensors/numbers (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_rng_state(),
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    _restore_numpy_rng(state["numpy"])
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
        assert original_copy is not None  # installed below only when the engine has one
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
        if not self.interval:
            return False
        return step % self.interval == 0

    # -- queries

    def latest(self, verify: bool = True) -> Path | None:
        """Newest complete checkpoint that verifies (identical answer on every rank).

        A damaged one on the way (a file missing, truncated or altered since the save) is
        reported with its file and reason and moved aside to `damaged-step-XXXXXXXX` (never
        deleted); the next newest is tried. `verify=False` skips the hashing.
        """
        d = self.dist
        found = [str(p) for _, p in reversed(complete_checkpoints(self.root))] if d.is_main else None
        for candidate in map(Path, d.broadcast_object(found)):
            problem = self._verify(candidate) if verify else None
            if problem is None:
                return candidate
            if d.is_main:
                try:
                    where = f"moved it aside to {move_aside(candidate)} (kept, not deleted)"
                except OSError as err:
                    where = f"could not move it aside ({_describe(err)}); skipping it"
                print(f"eagle-dist: {problem}; {where}; falling back to the next newest checkpoint",
                      file=sys.stderr, flush=True)
        return None

    def _verify(self, path: Path) -> str | None:
        """None if `path` verifies (or predates digests), else what is wrong: the same answer on
        every rank. Every rank hashes about 1/world_size of the bytes (see `_share`)."""
        d = self.dist
        recorded, problem = None, None
        if d.is_main:
            try:
                recorded = _recorded_files(path)
            except CheckpointError as err:
                problem = str(err)
        recorded, problem = d.broadcast_object((recorded, problem))
        if problem is not None or recorded is None:
            return problem
        sizes = {name: rec["size"] for name, rec in recorded.items()}
        mine = _check_files(path, recorded, _share(sizes, d.rank, d.world_size))
        found = [p for p in d.gather_object(mine) if p is not None]
        return f"checkpoint {path} is damaged: {found[0]}" if found else None

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
            engine: Any = model  # a DeepSpeedEngine, which nn.Module's typing does not know
            with _deepspeed_io(engine, errors):
                engine.save_checkpoint(
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

        manifest = self._hash_collectively(tmp, errors)
        if d.any_flag(bool(errors)):
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._fail(step, errors, stage="hashing the written files")

        outcome: str | None = None
        if d.is_main:
            try:
                self._commit(tmp, final, step, manifest)
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

    def _hash_collectively(self, tmp: Path, errors: list[BaseException]) -> dict[str, dict]:
        """Size and sha256 of every written file, each file hashed by one rank (all ranks call
        it). The files were just written, so they are read back from the page cache."""
        d = self.dist
        sizes: dict[str, int] | None = None
        if d.is_main:
            try:
                sizes = {name: (tmp / name).stat().st_size for name in _payload_files(tmp)}
            except OSError as err:
                errors.append(err)
        sizes = d.broadcast_object(sizes)
        mine: dict[str, dict] = {}
        if sizes is not None:
            try:
                mine = _digest_files(tmp, _share(sizes, d.rank, d.world_size))
            except OSError as err:
                errors.append(err)
        return {name: rec for part in d.gather_object(mine) for name, rec in part.items()}

    def _commit(self, tmp: Path, final: Path, step: int, manifest: dict[str, dict]) -> None:
        """Rank 0, after every rank succeeded: fsync, marker (with the digests) last, rename."""
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_file(path)
        marker = {"step": int(step), "world_size": self.dist.world_size, "completed_at": time.time(),
                  "digest": DIGEST, "files": manifest}
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

    def load(self, path: str | os.PathLike, model: Any, optimizer: Any = None, scheduler: Any = None,
             verify: bool = True) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; return the saved `extra`.

        Every rank must call it. Raises CheckpointDamagedError if a file does not match its
        recorded digest (`verify=False` when `latest()` has just checked it), CheckpointError for
        an incomplete or foreign folder, or weights that do not fit the model.
        """
        from safetensors.torch import load_file

        d = self.dist
        path = Path(path)
        problem = self._verify(path) if verify else None
        if problem is not None:
            raise CheckpointDamagedError(
                f"{problem}. It is refused; use an older checkpoint (`python -m eagle_dist.checkpoint "
                f"verify {path.parent}` checks them all)."
            )
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


if __name__ == "__main__":  # `python -m eagle_dist.checkpoint`: the same as `eagle-dist checkpoint`
    from eagle_dist.cli.checkpoint import main

    raise SystemExit(main())
