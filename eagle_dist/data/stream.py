"""The WebDataset stream: training batches with equal steps on every rank, validation exactly once.

    from eagle_dist.data.stream import build_train_loader, build_val_loader, read_manifest
    train = build_train_loader("shards/cocostuff27/train", batch_size=32, rank=r, world_size=w,
                               num_workers=4, seed=0)
    for batch in train:          # exactly len(train) batches on every rank
        batch["img"]             # uint8 [B, 224, 224, 3] as decoded (label: uint8, 255 = ignore)
        batch["aug_mask"]        # bool [B]: which images the official photometric transform blurs
        batch["aug_sigma"]       # float32 [B]: their blur sigmas (drawn in the workers)
        batch = finish_batch(batch)  # where the batch is (the device): img float32 [B, 3, 224, 224]
                                     # ImageNet-normalised, label int64, and batch["img_aug"],
                                     # the blurred view (the others are img's pixels)
        batch["label"]           # int64 [B, 224, 224], -1 = ignore
        batch["key"]             # list of sample keys
    val = build_val_loader("shards/cocostuff27/val", batch_size=16, rank=r, world_size=w, num_workers=4)
    train = train_loader(cfg.data, rank=r, world_size=w, seed=0)   # the same from the config's data section
    train.stats, val.stats       # {"samples", "corrupt_samples", "incomplete_samples",
                                 #  "missing_samples", "read_errors"}

Do not hand these loaders to ``accelerator.prepare``: they already split the data by rank, and
accelerate would re-shard or broadcast them.

How the splitting works (and why):

* Training resamples shards with replacement (``webdataset.ResampledShards``): every worker of
  every rank draws an endless stream of shards from its own seed ``(seed, rank, worker, epoch)``,
  and ``with_epoch`` on the ``WebLoader`` cuts exactly ``steps_per_epoch`` batches.  So all ranks
  run the same number of steps whatever the shard count, sample counts or skipped samples, and
  DDP never waits on a rank that ran out of data.  Fewer shards than ranks x workers only makes
  streams overlap more (a warning says so).
* Validation must see each sample exactly once.  The manifest's per-shard counts define a global
  sample index; the ``world_size x num_workers`` (rank, worker) slots each take one contiguous
  block of it (block sizes differ by at most one sample) and read only the shards that overlap
  their block, skipping undecoded members before the block starts.  This works for any shard
  count, including fewer shards than slots, where splitting whole shards by rank then worker
  would leave slots empty and cannot balance.  Ranks may end with one batch more or less; the
  evaluation sums its statistics with one all-reduce after the loop, so that is harmless.

Corrupt members (undecodable image or label, size mismatch), incomplete samples and unreadable or
truncated tars are skipped with a logged warning and counted.  A shard that ends before the
sample count its manifest entry promises (a truncated tar often ends cleanly at a member
boundary, which the tar reader does not report) counts the shortfall as ``missing_samples``.
The counters live in shared memory, so ``loader.stats`` in the main process includes every
worker; the trainer reads it after (or during) an epoch and may all-reduce it across ranks.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from eagle_dist.config import DataConfig
from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD
from eagle_dist.errors import EagleError

log = logging.getLogger(__name__)

IGNORE = -1
STAT_FIELDS = ("samples", "corrupt_samples", "incomplete_samples", "missing_samples", "read_errors")
# An endless training stream that keeps failing would spin forever; give up after this many
# errors in a row without one good sample (plus a few per shard, so every shard gets a chance).
_MAX_ERRORS_IN_A_ROW = 200
_LOGGED_PER_PROCESS = 20


class DataError(EagleError, RuntimeError):
    """The shards cannot be streamed; the message says what to do."""


# --------------------------------------------------------------------------- manifest

def read_manifest(shard_dir: str | Path) -> dict:
    """The shard folder's manifest.json, checked: it exists, lists shards, and they are all there."""
    folder = Path(shard_dir)
    hint = "build it with `python -m eagle_dist.shard --source ... --split ... --out " + str(folder) + "`"
    if not folder.is_dir():
        raise DataError(f"shard folder not found: {folder}; {hint}")
    path = folder / "manifest.json"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no manifest.json in {folder} (an unfinished or multi-part build?); {hint}, "
                        f"or run `python -m eagle_dist.shard merge --out {folder}`") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rebuild the shards") from None
    for key in ("shards", "classes", "ignore_value"):
        if key not in manifest:
            raise DataError(f"{path} has no '{key}' entry; it was not written by eagle_dist.data.shards")
    if not manifest["shards"] or sum(s["samples"] for s in manifest["shards"]) == 0:
        raise DataError(f"{path} lists no samples; {hint}")
    missing = [s["name"] for s in manifest["shards"] if not (folder / s["name"]).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shards listed in {path} are missing ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}); rebuild them (the builder resumes)")
    return manifest


# --------------------------------------------------------------------------- counters

class StreamStats:
    """Skip/sample counters shared by the main process and its DataLoader workers.

    One row per process (row 0 = main, row 1 + i = worker i), so no two processes ever write the
    same cell; the tensor is in shared memory, so forked or spawned workers update it in place.
    """

    def __init__(self, num_workers: int):
        self._table = torch.zeros(num_workers + 1, len(STAT_FIELDS), dtype=torch.int64).share_memory_()
        self._logged = 0
        self._row: tuple[int, np.ndarray] | None = None  # (pid, numpy view of that process's row)

    def __getstate__(self) -> dict:
        # The numpy view is per process: pickling it would copy the numbers out of shared memory.
        return {**self.__dict__, "_row": None}

    def add(self, field: str, n: int = 1) -> None:
        # A numpy view makes the per-sample += cost ~1 us instead of ~40 for a tensor index; the
        # pid check keeps a forked worker from writing through a view its parent made.
        if self._row is None or self._row[0] != os.getpid():
            info = torch.utils.data.get_worker_info()
            self._row = (os.getpid(), self._table.numpy()[0 if info is None else info.id + 1])
        self._row[1][STAT_FIELDS.index(field)] += n

    def warn(self, field: str, message: str, n: int = 1) -> None:
        self.add(field, n)
        self._logged += 1
        if self._logged <= _LOGGED_PER_PROCESS:
            log.warning("skipped: %s", message)
            if self._logged == _LOGGED_PER_PROCESS:
                log.warning("further skips in this worker are counted but not logged (see loader.stats)")

    def totals(self) -> dict[str, int]:
        return dict(zip(STAT_FIELDS, self._table.sum(0).tolist()))


class _ErrorHandler:
    """WebDataset exception handler: count and carry on; give up if nothing good ever arrives."""

    def __init__(self, stats: StreamStats, num_shards: int):
        self.stats = stats
        self.limit = _MAX_ERRORS_IN_A_ROW + 4 * num_shards
        self.in_a_row = 0

    def __call__(self, exn: Exception) -> bool:
        self.stats.warn("read_errors", f"unreadable shard data: {exn!r}"[:500])
        self.failed()
        return True

    def failed(self) -> None:
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise DataError(f"{self.in_a_row} read/decode errors in a row without one usable sample; "
                            "the shards look damaged: rebuild them with `python -m eagle_dist.shard`")

    def ok(self) -> None:
        self.in_a_row = 0


# --------------------------------------------------------------------------- transforms

def resize_shorter_centre_crop(im: Image.Image, size: int) -> np.ndarray:
    """Official train/val geometry: shorter side -> `size` (nearest, also for RGB), centre crop.

    Same arithmetic as torchvision's Resize(int) (long side truncated) and CenterCrop (offsets
    rounded half to even) on PIL images.
    """
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.NEAREST)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(im)[top:top + size, left:left + size]


class _Decode:
    """Raw tar sample -> {"key", "img" uint8 [R,R,3], "label" uint8 [R,R]}, or None when unusable."""

    def __init__(self, resolution: int, stats: StreamStats, handler: _ErrorHandler):
        self.resolution, self.stats, self.handler = resolution, stats, handler

    def __call__(self, sample: dict) -> dict | None:
        key, url = sample.get("__key__"), sample.get("__url__")
        image_bytes = sample.get("jpg", sample.get("img.png"))
        label_bytes = sample.get("label.png")
        if image_bytes is None or label_bytes is None:
            self.stats.warn("incomplete_samples", f"{key} in {url}: image or label member missing")
            self.handler.failed()
            return None
        try:
            # In-memory bytes: nothing to close, and the decoded images stay usable afterwards.
            opened = Image.open(io.BytesIO(image_bytes))
            image = opened if opened.mode == "RGB" else opened.convert("RGB")  # convert would copy
            image.load()  # decode now: a damaged JPEG is caught here
            label = Image.open(io.BytesIO(label_bytes))
            label.load()
            if label.mode != "L":
                raise ValueError(f"label PNG has mode {label.mode}, expected L")
            if label.size != image.size:
                raise ValueError(f"label {label.size} and image {image.size} differ in size")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            self.stats.warn("corrupt_samples", f"{key} in {url}: {exc}")
            self.handler.failed()
            return None
        self.handler.ok()
        self.stats.add("samples")
        return {
            "key": key,
            "img": resize_shorter_centre_crop(image, self.resolution),
            "label": resize_shorter_centre_crop(label, self.resolution),
        }


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalise(img_BCHW: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (any strides) -> float32, ToTensor + Normalize in the official order
    (bit-identical floats), on the tensor's device."""
    mean, std = _MEAN.to(img_BCHW.device), _STD.to(img_BCHW.device)
    return img_BCHW.to(torch.float32).div(255).sub_(mean).div_(std)


def label_ids(label_BHW: torch.Tensor) -> torch.Tensor:
    """Stored uint8 labels -> int64 class ids with ``IGNORE`` for 255, on the tensor's device."""
    label = label_BHW.to(torch.int64)
    label[label == 255] = IGNORE
    return label


def collate_uint8(samples: list[dict]) -> dict[str, Any]:
    """Decoded samples -> the training stream's batch as decoded: ``img`` uint8 ``[B, R, R, 3]``
    (channels-last), ``label`` uint8 ``[B, R, R]``; :func:`finish_batch` makes the step's tensors."""
    return {"img": torch.from_numpy(np.stack([s["img"] for s in samples])),
            "label": torch.from_numpy(np.stack([s["label"] for s in samples])), "key": [s["key"] for s in samples]}


def collate(samples: list[dict]) -> dict[str, Any]:
    """Decoded samples -> batch; ToTensor + Normalize in the official order (bit-identical floats)."""
    # Channels-first while still uint8 (a quarter of the bytes to move), then the float ops.
    batch = collate_uint8(samples)
    img = batch["img"].permute(0, 3, 1, 2).contiguous()
    return {**batch, "img": normalise(img), "label": label_ids(batch["label"])}


def gaussian_kernels3(sigma_B: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] Gaussian kernels as torchvision's GaussianBlur(3) builds them (x = -1, 0, 1)."""
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=sigma_B.dtype, device=sigma_B.device)
    k_B3 = torch.exp(-0.5 * (x[None] / sigma_B[:, None]) ** 2)
    k_B3 = k_B3 / k_B3.sum(1, keepdim=True)
    return k_B3[:, :, None] * k_B3[:, None, :]


def gaussian_blur3(img_BCHW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a per-image sigma and reflect padding, as one grouped convolution."""
    b, c, h, w = img_BCHW.shape
    weight = gaussian_kernels3(sigma_B).to(img_BCHW.dtype).repeat_interleave(c, 0)[:, None]  # [B*C, 1, 3, 3]
    padded = F.pad(img_BCHW.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def draw_blur(batch_size: int, blur_p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The official blur's random draws for a batch: bool ``[B]`` applied (p = `blur_p`) and the
    float32 ``[B]`` sigmas in U(0.1, 2.0), in this order from `generator`."""
    apply_B = torch.rand(batch_size, generator=generator) < blur_p
    sigma_B = torch.empty(batch_size).uniform_(0.1, 2.0, generator=generator)
    return apply_B, sigma_B


def blur_chosen(img_BCHW: torch.Tensor, apply_B: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """`img_BCHW` with the images where `apply_B` is set blurred with their sigma (a new tensor)."""
    out = img_BCHW.clone()
    chosen = apply_B.nonzero().squeeze(1)
    if len(chosen):  # convolve only the images that are blurred (about half of them)
        out[chosen] = gaussian_blur3(img_BCHW[chosen], sigma_B[chosen])
    return out


def photometric_aug(img_BCHW: torch.Tensor, blur_p: float, generator: torch.Generator,
                    return_mask: bool = False):
    """Official `img_pos_aug`: RandomApply([GaussianBlur(3, sigma=(0.1, 2.0))], p) per image, on the
    normalised tensor (colour jitter and grayscale are commented out in the official code).

    With ``return_mask`` also returns the bool ``[B]`` mask of the blurred images: the training
    step runs the backbone only on those and reuses ``img``'s keys for the others (the draws are
    the same either way)."""
    apply_B, sigma_B = draw_blur(img_BCHW.shape[0], blur_p, generator)
    out = blur_chosen(img_BCHW, apply_B, sigma_B)
    return (out, apply_B) if return_mask else out


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A training stream batch made ready for the step, where the batch is (on the device in
    training): ``img`` normalised to float32, ``label`` int64 with ``IGNORE``, and ``img_aug``, the
    blur drawn in the workers (``aug_mask``, ``aug_sigma``) applied as one batched op.

    The numbers equal the official per-sample transform's and :func:`photometric_aug`'s with the
    same draws.  A batch already finished (float ``img``) keeps its tensors.
    """
    out = dict(batch)
    if out["img"].dtype == torch.uint8:  # [B, R, R, 3]
        out["img"] = normalise(out["img"].permute(0, 3, 1, 2)).contiguous()
    if out["label"].dtype == torch.uint8:
        out["label"] = label_ids(out["label"])
    if "img_aug" not in out and "aug_sigma" in out:
        out["img_aug"] = blur_chosen(out["img"], out["aug_mask"], out["aug_sigma"])
    return out


# --------------------------------------------------------------------------- seeding

class _StreamState:
    """Seed inputs the main process sets before each epoch; workers read them when they start."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def worker_seed(self, stream: int) -> int:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        seq = np.random.SeedSequence([self.seed, self.rank, worker, self.epoch, stream])
        return int(seq.generate_state(1, dtype=np.uint32)[0])


class _SeedFn:
    """Picklable `worker_seed` callable for ResampledShards (spawned workers must unpickle it)."""

    def __init__(self, state: _StreamState, stream: int):
        self.state, self.stream = state, stream

    def __call__(self) -> int:
        return self.state.worker_seed(self.stream)


_SHARDS, _SHUFFLE, _AUGMENT = 1, 2, 3


class _Shuffle:
    def __init__(self, state: _StreamState, bufsize: int):
        self.state, self.bufsize = state, bufsize

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(self.state.worker_seed(_SHUFFLE))
        yield from wds.shuffle(self.bufsize, rng=rng)(src)


class _Augment:
    def __init__(self, state: _StreamState, blur_p: float):
        self.state, self.blur_p = state, blur_p

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(self.state.worker_seed(_AUGMENT))
        for batch in batches:
            # Only the draws: normalising and the blur run on the device (finish_batch), so no
            # worker spends most of its time on float passes, and batches are an eighth the bytes.
            batch["aug_mask"], batch["aug_sigma"] = draw_blur(batch["img"].shape[0], self.blur_p, generator)
            yield batch


# --------------------------------------------------------------------------- reading shards

def read_shard(url: str, expected: int, handler: _ErrorHandler, stats: StreamStats,
               start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples ``start:stop`` of one shard; a shard that ends early is reported and counted."""
    stop = expected if stop is None else stop
    got = 0
    # Members before `start` are read past but never decoded.
    for sample in itertools.islice(wds.tarfile_samples([{"url": url}], handler=handler), start, stop):
        got += 1
        yield sample
    if got < stop - start:
        stats.warn("missing_samples", f"{url} ended {stop - start - got} samples early "
                   "(truncated or damaged; rebuild it with python -m eagle_dist.shard)", n=stop - start - got)
        handler.failed()


class _ShardReader:
    """Training stage: shard urls (from ResampledShards) -> raw samples, checked against the manifest."""

    def __init__(self, counts: dict[str, int], handler: _ErrorHandler, stats: StreamStats):
        self.counts, self.handler, self.stats = counts, handler, stats

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        for shard in shards:
            yield from read_shard(shard["url"], self.counts[shard["url"]], self.handler, self.stats)


# --------------------------------------------------------------------------- loaders

# The signals that stop a run (eagle_dist.engine.trainer).  Slurm (scancel, preemption, the time
# limit), `kill -- -PGID` and launchers that pass a signal on to a worker's process group send them
# to the loader workers as well; torch's workers die of SIGTERM from anyone but their parent
# (SIGINT raises KeyboardInterrupt), and the rank then fails with "DataLoader worker exited
# unexpectedly" before it can save.  Only the rank decides how the run stops.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def shield_worker_from_stop_signals(_worker_id: int = 0) -> None:
    """`worker_init_fn` of every loader here: the stop signals no longer reach this worker.

    They are blocked and taken by a thread that drops them, except a SIGTERM from the parent:
    that is the DataLoader's own shutdown of a worker that did not leave in time
    (``Process.terminate``), obeyed as torch's worker handler obeys it.  The normal shutdown
    (the parent's end-of-iteration message) is unchanged.  The workers start with the signals
    blocked already (:meth:`StreamLoader.__iter__`), so one that arrives while a worker starts
    waits for this thread instead of killing it.
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; ignore all three
        for sig in WORKER_IGNORED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    parent = os.getppid()
    # Blocked in this (main) thread before any other starts: every later thread inherits the mask,
    # so only sigwaitinfo below ever sees these signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    threading.Thread(target=_drop_stop_signals, args=(parent,), name="eagle-stop-signals", daemon=True).start()


def _drop_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(WORKER_IGNORED_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Workers forked in here inherit the stop signals blocked; this process gets the ones that
    arrived meanwhile when it leaves (delayed, never lost)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _web_loader(pipeline: wds.DataPipeline, num_workers: int, pin_memory: bool) -> wds.WebLoader:
    """The one place loaders are made: workers shielded from the stop signals."""
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=shield_worker_from_stop_signals if num_workers > 0 else None)


class StreamLoader:
    """Iterable of batches with ``stats``, ``num_samples`` and ``len()``; one epoch per ``iter()``."""

    def __init__(self, loader: wds.WebLoader, stats: StreamStats, manifest: dict, num_batches: int,
                 num_samples: int, state: _StreamState | None = None):
        self._loader, self._stats, self._state = loader, stats, state
        self.manifest, self.num_batches, self.num_samples = manifest, num_batches, num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        if self._state is not None:
            # Workers are (re)started by this iter() call and copy the state now, so each epoch
            # draws new shards, shuffles and blurs while staying reproducible.
            self._state.epoch = self.epoch
        self.epoch += 1
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        batches = iter(self._loader)
        with _stop_signals_blocked():  # the first batch starts the workers (see the handler above)
            first = next(batches, None)
        if first is None:
            return
        yield first
        yield from batches

    def __len__(self) -> int:
        return self.num_batches

    @property
    def stats(self) -> dict[str, int]:
        return self._stats.totals()


def _shard_counts(shard_dir: str | Path, manifest: dict) -> dict[str, int]:
    """Absolute shard path -> sample count, in manifest order."""
    folder = Path(shard_dir).resolve()
    return {str(folder / s["name"]): int(s["samples"]) for s in manifest["shards"]}


def _check(batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad loader arguments: batch_size={batch_size}, rank={rank}, "
                        f"world_size={world_size}, num_workers={num_workers}")


def build_train_loader(shard_dir: str | Path, batch_size: int, rank: int, world_size: int, num_workers: int,
                       seed: int, resolution: int = 224, blur_p: float = 0.5, shuffle_buffer: int = 1000,
                       steps_per_epoch: int | None = None, pin_memory: bool = False) -> StreamLoader:
    """Endless resampled stream cut into `steps_per_epoch` batches per ``iter()`` on every rank.

    `steps_per_epoch` defaults to one pass over the data by the whole job:
    ``num_samples // (batch_size * world_size)`` (at least 1).
    """
    _check(batch_size, rank, world_size, num_workers)
    manifest = read_manifest(shard_dir)
    counts = _shard_counts(shard_dir, manifest)
    urls = [url for url, n in counts.items() if n > 0]
    num_samples = sum(counts.values())
    if len(urls) < world_size * max(1, num_workers):
        log.warning("%d shards for %d ranks x %d workers: streams will repeat shards more often; "
                    "build with a smaller --samples-per-shard for more variety", len(urls), world_size,
                    max(1, num_workers))
    if steps_per_epoch is None:
        steps_per_epoch = max(1, num_samples // (batch_size * world_size))
    stats = StreamStats(num_workers)
    handler = _ErrorHandler(stats, len(urls))
    state = _StreamState(seed, rank)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=_SeedFn(state, _SHARDS), deterministic=True),
        _ShardReader(counts, handler, stats),
        _Shuffle(state, shuffle_buffer) if shuffle_buffer > 1 else None,
        wds.map(_Decode(resolution, stats, handler)),
        wds.batched(batch_size, collation_fn=collate_uint8, partial=False),
        _Augment(state, blur_p),
    )
    loader = _web_loader(pipeline, num_workers, pin_memory).with_epoch(steps_per_epoch)
    return StreamLoader(loader, stats, manifest, steps_per_epoch, num_samples, state)


def slot_pieces(counts: list[int], slots: int) -> list[list[tuple[int, int, int]]]:
    """Split the global sample index of shards with `counts` samples into `slots` contiguous blocks.

    Returns, per slot, ``(shard, start, stop)`` pieces in reading order.  Blocks differ in size by
    at most one sample and together cover every sample exactly once.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    pieces: list[list[tuple[int, int, int]]] = []
    for slot in range(slots):
        lo, hi = slot * total // slots, (slot + 1) * total // slots
        mine = []
        for shard in range(len(counts)):
            start, stop = max(lo, offsets[shard]), min(hi, offsets[shard + 1])
            if start < stop:
                mine.append((shard, int(start - offsets[shard]), int(stop - offsets[shard])))
        pieces.append(mine)
    return pieces


class _ValSource(torch.utils.data.IterableDataset):
    """First pipeline stage of validation: this (rank, worker) slot's block of samples."""

    def __init__(self, counts: dict[str, int], pieces: list[list[tuple[int, int, int]]], rank: int,
                 num_workers: int, handler: _ErrorHandler, stats: StreamStats):
        super().__init__()
        self.urls, self.counts, self.pieces, self.rank = list(counts), list(counts.values()), pieces, rank
        self.num_workers, self.handler, self.stats = max(1, num_workers), handler, stats

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        slot = self.rank * self.num_workers + (0 if info is None else info.id)
        for shard, start, stop in self.pieces[slot]:
            yield from read_shard(self.urls[shard], self.counts[shard], self.handler, self.stats, start, stop)


def build_val_loader(shard_dir: str | Path, batch_size: int, rank: int, world_size: int, num_workers: int,
                     resolution: int = 320, pin_memory: bool = False) -> StreamLoader:
    """Every validation sample exactly once across all ranks and workers (see the module docstring)."""
    _check(batch_size, rank, world_size, num_workers)
    manifest = read_manifest(shard_dir)
    counts = _shard_counts(shard_dir, manifest)
    workers = max(1, num_workers)
    pieces = slot_pieces(list(counts.values()), world_size * workers)
    per_worker = [sum(stop - start for _, start, stop in pieces[rank * workers + w]) for w in range(workers)]
    stats = StreamStats(num_workers)
    handler = _ErrorHandler(stats, len(counts))
    pipeline = wds.DataPipeline(
        _ValSource(counts, pieces, rank, num_workers, handler, stats),
        wds.map(_Decode(resolution, stats, handler)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    loader = _web_loader(pipeline, num_workers, pin_memory)
    num_batches = sum(math.ceil(n / batch_size) for n in per_worker)
    return StreamLoader(loader, stats, manifest, num_batches, sum(per_worker))


def train_loader(section: DataConfig, rank: int, world_size: int, seed: int, steps_per_epoch: int | None = None,
                 pin_memory: bool = False) -> StreamLoader:
    """:func:`build_train_loader` over ``train_shards`` with the ``data`` section's batch, workers,
    resolution, blur and shuffle settings."""
    return build_train_loader(
        section.train_shards, batch_size=section.batch_size, rank=rank, world_size=world_size,
        num_workers=section.num_workers, seed=seed, resolution=section.resolution, blur_p=section.blur_p,
        shuffle_buffer=section.shuffle_buffer, steps_per_epoch=steps_per_epoch, pin_memory=pin_memory,
    )


def val_loader(section: DataConfig, shards: str | Path, rank: int, world_size: int,
               pin_memory: bool = False) -> StreamLoader:
    """:func:`build_val_loader` over `shards` with the ``data`` section's ``val_batch_size``,
    ``num_workers`` and ``val_resolution``."""
    return build_val_loader(shards, batch_size=section.val_batch_size, rank=rank, world_size=world_size,
                            num_workers=section.num_workers, resolution=section.val_resolution,
                            pin_memory=pin_memory)
