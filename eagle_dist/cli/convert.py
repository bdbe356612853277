"""Convert an official EAGLE checkpoint (.ckpt) into an eagle-dist run folder, once.

    python -m eagle_dist.convert eagle_cocostuff27_vit_small8.ckpt converted/coco_vits8
    eagle-dist convert eagle_cocostuff27_vit_small8.ckpt converted/coco_vits8
    python -m eagle_dist.evaluate --checkpoint converted/coco_vits8 --shards shards/cocostuff27/val

The official file is read once with the restricted reader (eagle_dist.method.official); the
folder written holds no pickle at all, so later loads unpickle nothing:

    OUT/config.yaml                            the resolved eagle-dist config of the official run
    OUT/backbone.safetensors                   the DINO ViT (timm names); config model.weights points here
    OUT/checkpoints/step-XXXXXXXX/             a complete eagle-dist checkpoint of the heads
        model.safetensors, trainer_state.json (with the config), COMPLETE

``model.weights`` is written as an absolute path: after moving the folder, pass
``model.weights=NEW/backbone.safetensors`` as an override to evaluate / predict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eagle_dist import checkpoint as ckpt_mod
from eagle_dist import config as config_mod

BACKBONE_FILE = "backbone.safetensors"


def convert(source: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the run folder; returns its step folder.  Raises OfficialCheckpointError/CheckpointError."""
    from safetensors.torch import save_file

    from eagle_dist.method.eagle import build_model
    from eagle_dist.method.official import load_official_checkpoint

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ckpt_mod.CheckpointError(f"{out} exists and is not empty; choose a new folder or pass --force")
    official = load_official_checkpoint(source)
    build_model(official.cfg, official=official)  # checks every key and shape before anything is written
    cfg = official.cfg
    cfg.model.weights = str((out / BACKBONE_FILE).resolve())
    cfg.model.init_from = None
    step_dir = out / "checkpoints" / ckpt_mod.step_dir_name(official.global_step)
    step_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in official.backbone_state.items()}, str(out / BACKBONE_FILE))
    save_file({k: v.contiguous() for k, v in official.heads_state.items()}, str(step_dir / ckpt_mod.MODEL_FILE))
    config_mod.save_yaml(cfg, out / "config.yaml")
    extra = {"step": official.global_step, "config": config_mod.to_dict(cfg),
             "converted_from": {"path": str(Path(source).resolve()), "epoch": official.epoch,
                                "lightning_version": official.lightning_version, "skipped_keys": official.skipped}}
    state = {"format": ckpt_mod.FORMAT_VERSION, "step": official.global_step, "world_size": 1,
             "strategy": "converted", "zero_stage": None, "extra": extra}
    (step_dir / ckpt_mod.STATE_FILE).write_text(json.dumps(state, indent=1))
    (step_dir / ckpt_mod.MARKER).write_text("{}")  # last: the folder is complete
    return step_dir


def main(argv: list[str] | None = None) -> int:
    from eagle_dist.errors import EagleError

    parser = argparse.ArgumentParser(prog="python -m eagle_dist.convert",
                                     description="Convert an official EAGLE .ckpt into an eagle-dist run folder.")
    parser.add_argument("checkpoint", help="the official .ckpt file")
    parser.add_argument("out", help="output run folder (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")
    args = parser.parse_args(argv)
    try:
        step_dir = convert(args.checkpoint, args.out, force=args.force)
    except EagleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {step_dir} and {Path(args.out) / BACKBONE_FILE}; use --checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
