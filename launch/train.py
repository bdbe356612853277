"""Train EAGLE.  Thin entry point: config -> trainer -> train, cleanup in `finally`.

    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml launch/train.py      # embedded default
    accelerate launch launch/train.py --config configs/cocostuff27.yaml model.weights=W.pth
    torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        launch/train.py --config configs/cocostuff27.yaml
    python launch/train.py train.max_steps=10                                               # one process

With no --config the embedded default (configs/default.yaml: synthetic data, small random ViT)
runs.  Any `key.sub=value` argument overrides the config.

The embedded default wants 2 processes.  Started without --config as one process on a CPU
machine with at least 2 cores, as `accelerate launch launch/train.py` without an accelerate
config does, it starts itself again under torchrun with 2 processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import eagle_dist  # noqa: E402,F401  (torchvision shim first)
from eagle_dist.config import ConfigError, load_config  # noqa: E402
from eagle_dist.distributed import relaunch_under_torchrun  # noqa: E402

DEFAULT = REPO / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--config" or a.startswith("--config=") or a in ("-h", "--help") for a in argv):
        try:  # a bad override is reported here, with exit 2, not after the relaunch
            load_config(DEFAULT, argv)
        except ConfigError as err:
            print(f"eagle-dist: config error: {err}", file=sys.stderr)
            return 2
        code = relaunch_under_torchrun(Path(__file__).resolve(), ["--config", str(DEFAULT), *argv],
                                       reason="embedded default on CPU")
        if code is not None:
            return code
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT), help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"eagle-dist: config error: {err}", file=sys.stderr)
        return 2

    from eagle_dist.engine.trainer import Trainer, format_final_table
    from eagle_dist.errors import USER_ERRORS

    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
        if trainer.dist.is_main and summary:
            print(format_final_table(summary, trainer.run_dir, trainer.tracker.uri_for_display), flush=True)
        return 0
    except USER_ERRORS as err:
        print(f"eagle-dist: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
