"""What a training run reads: its shard folders checked (synthetic ones built on first use), the
folder evaluation reads, and the training stream from any step on.

    from eagle_dist.data.prepare import TrainingStream, prepare_training_data
    manifest, eval_shards = prepare_training_data(cfg, dist)     # every rank; may set model.n_classes=0
    stream = TrainingStream(cfg, dist)
    for batch in stream.batches(start_step): ...
    stream.local_skips()                                         # this rank's skipped samples so far

Steps, not epochs: the stream is endless and every count is in optimizer steps.  It is cut into
*segments* of ``train.ckpt_interval`` steps; segment ``s`` is drawn from a loader seeded with
``(train.seed, s)``.  A run resumed at step ``t`` rebuilds segment ``t // ckpt_interval`` and
skips the batches already consumed, so a resumed run sees exactly the data an uninterrupted run
would have seen (with the RNG states restored, it computes the same weights).

Labels are optional: training shards without classes (a folder of photos) switch the run to
``model.n_classes = 0`` (recorded in the resolved config, so evaluation, predict and resumes
rebuild the same model); validation shards are then optional.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Generator

from eagle_dist.config import Config
from eagle_dist.data import stream as data
from eagle_dist.data.stream import DataError

# Stream counters (eagle_dist.data.stream.STAT_FIELDS) that mean a sample was skipped.
SKIP_FIELDS = ("corrupt_samples", "incomplete_samples", "missing_samples", "read_errors")


def segment_seed(seed: int, segment: int) -> int:
    return (seed * 1_000_003 + segment * 7919) % (2**31 - 1)


def prepare_training_data(cfg: Config, dist: Any) -> tuple[dict, str]:
    """(training manifest, folder evaluation reads); every rank calls it (rank 0 builds the
    embedded default's synthetic shards).  Shards without labels set ``cfg.model.n_classes = 0``."""
    if cfg.dataset == "synthetic":
        ensure_synthetic_shards(cfg, dist)
    if not Path(cfg.data.train_shards).is_dir():
        raise DataError(
            f"train shard folder not found: {cfg.data.train_shards}. Build it with "
            f"`python -m eagle_dist.shard --source ... --split train --out {cfg.data.train_shards}` "
            "or set data.train_shards."
        )
    manifest = data.read_manifest(cfg.data.train_shards)
    classes = [c["name"] if isinstance(c, dict) else str(c) for c in manifest["classes"]]
    if not classes and not cfg.model.unlabeled:
        # Shards without labels (a folder of photos): EAGLE trains without them; only the linear
        # probe and the supervised metrics need labels.
        cfg.model.n_classes = 0
    elif classes and not cfg.model.unlabeled and len(classes) != cfg.model.n_classes:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise DataError(
            f"the shards in {cfg.data.train_shards} have {len(classes)} classes ({shown}) but "
            f"model.n_classes={cfg.model.n_classes}; set model.n_classes={len(classes)}, or "
            f"model.n_classes=0 to train without the labels (the cluster probe then finds "
            f"model.n_clusters={cfg.model.n_clusters} segments)"
        )
    eval_shards = choose_eval_shards(cfg, manifest, dist)
    if cfg.model.unlabeled:
        why = f"the shards in {cfg.data.train_shards} carry no labels" if not classes else "model.n_classes=0"
        where = "the training shards" if eval_shards == cfg.data.train_shards else eval_shards
        dist.print(
            f"training without labels ({why}): the cluster probe finds model.n_clusters={cfg.model.n_clusters} "
            "segments; the linear probe and the supervised metrics (mIoU, accuracy) are off; evaluation on "
            f"{where} reports the segments' shares of pixels and images and the EiCue agreement between "
            "the two views"
        )
    return manifest, eval_shards


def choose_eval_shards(cfg: Config, manifest: dict, dist: Any) -> str:
    """The folder evaluation reads: data.val_shards; without labels, the training shards when
    there is no validation split of the same data (validation is optional then)."""
    train, val = cfg.data.train_shards, cfg.data.val_shards
    if not cfg.model.unlabeled:
        if not val or not Path(val).is_dir():
            raise DataError(
                f"val shard folder not found: {val or '(data.val_shards is empty)'}. Build it with "
                f"`python -m eagle_dist.shard --source ... --split val --out {val or 'FOLDER'}` "
                "or set data.val_shards (runs without labels need none)."
            )
        return val
    if not val:
        return train
    if not Path(val).is_dir():
        dist.print(f"data.val_shards={val} does not exist; evaluating on the training shards "
                   "(set data.val_shards= to silence this)")
        return train
    theirs, ours = data.read_manifest(val).get("dataset"), manifest.get("dataset")
    if theirs != ours:
        # The embedded default's synthetic split next to a folder of photos, for instance.
        dist.print(f"data.val_shards={val} holds dataset '{theirs}', the training shards '{ours}'; "
                   "evaluating on the training shards (set data.val_shards= to silence this)")
        return train
    return val


def ensure_synthetic_shards(cfg: Config, dist: Any) -> None:
    """Rank 0 builds the synthetic train/val shards the config names when they are missing."""
    from eagle_dist.data.shards import ShardOptions, build
    from eagle_dist.data.sources import SyntheticSpec

    train_manifest = Path(cfg.data.train_shards) / "manifest.json"
    if train_manifest.is_file() and not str(json.loads(train_manifest.read_text()).get("dataset", "")).startswith(
            "synthetic"):
        return  # the demo config pointed at real shards: generate nothing next to them
    folders = {"train": cfg.data.train_shards, "val": cfg.data.val_shards}
    missing = [s for s, f in folders.items() if f and not (Path(f) / "manifest.json").is_file()]
    if missing and dist.is_main:
        for split in missing:
            folder = folders[split]
            dist.print(f"building synthetic {split} shards in {folder} (first run only)")
            spec = SyntheticSpec(num_classes=cfg.model.n_classes or SyntheticSpec.num_classes)
            build(ShardOptions(source="synthetic", split=split, out=Path(folder), samples_per_shard=64,
                               workers=1, progress=False, quiet=True, source_options={"spec": spec}))
    dist.barrier()


class TrainingStream:
    """This rank's training batches from any step on, segment by segment (module docstring)."""

    def __init__(self, cfg: Config, dist: Any):
        self.cfg, self.dist = cfg, dist
        self._loader: data.StreamLoader | None = None  # the current segment's loader (its skip counters)
        self._skips_done = dict.fromkeys(SKIP_FIELDS, 0)  # finished segments

    def batches(self, start_step: int) -> Generator[dict, None, None]:  # the trainer close()s it
        cfg = self.cfg
        seg_len = max(1, cfg.train.ckpt_interval)
        segment, offset = divmod(start_step, seg_len)
        while True:
            loader = data.train_loader(cfg.data, rank=self.dist.rank, world_size=self.dist.world_size,
                                       seed=segment_seed(cfg.train.seed, segment), steps_per_epoch=seg_len,
                                       pin_memory=self.dist.pin_memory)
            self._loader = loader
            for i, batch in enumerate(loader):
                if i >= offset:
                    yield batch
            for key in SKIP_FIELDS:
                self._skips_done[key] += loader.stats[key]
            self._loader = None
            offset = 0
            segment += 1

    def local_skips(self) -> dict[str, int]:
        """Samples this rank's stream skipped so far (finished segments and the current one)."""
        mine = dict(self._skips_done)
        if self._loader is not None:
            current = self._loader.stats
            mine = {key: mine[key] + current[key] for key in SKIP_FIELDS}
        return mine
