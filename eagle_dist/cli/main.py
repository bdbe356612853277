"""`eagle-dist`: one console script, one subcommand per tool.

    eagle-dist shard --source folder --root photos/ --split train --out shards/mine/train
    eagle-dist evaluate --checkpoint runs/NAME --shards shards/cocostuff27/val
    eagle-dist predict --checkpoint runs/NAME --input photos/ --out predictions/
    eagle-dist visualize eigen --checkpoint runs/NAME --input photo.jpg
    eagle-dist convert eagle_cocostuff27_vit_small8.ckpt converted/coco
    eagle-dist sweep --out sweeps/NAME --config configs/cocostuff27.yaml --seeds 0-4 --arm A:k=v --arm B:k=w
    eagle-dist bench step
    eagle-dist checkpoint verify runs/NAME

`eagle-dist TOOL --help` shows a tool's flags.  Each tool is also `python -m eagle_dist.TOOL`.
Training is launched with `accelerate launch launch/train.py` or `torchrun launch/train.py`.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one line of help)
TOOLS: dict[str, tuple[str, str]] = {
    "shard": ("eagle_dist.cli.shard", "build WebDataset shards from a dataset or an image folder"),
    "evaluate": ("eagle_dist.cli.evaluate", "evaluate a checkpoint (official and strict protocols)"),
    "predict": ("eagle_dist.cli.predict", "segment images of any size with a checkpoint"),
    "visualize": ("eagle_dist.cli.visualize", "figures of what a checkpoint computes (EiCue)"),
    "convert": ("eagle_dist.cli.convert", "convert an official EAGLE .ckpt into an eagle-dist run folder"),
    "sweep": ("eagle_dist.cli.sweep", "seeds x arms of training runs, and their statistics"),
    "bench": ("eagle_dist.cli.bench", "benchmarks: training step, eigensolvers, data"),
    "checkpoint": ("eagle_dist.cli.checkpoint", "list (and verify) the checkpoints of a run"),
}
# Other names that reach a tool (not listed in the usage).
ALIASES = {"checkpoints": "checkpoint"}


def usage() -> str:
    width = max(len(name) for name in TOOLS)
    lines = ["usage: eagle-dist TOOL [ARGS...]", "", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = ALIASES.get(args[0], args[0]), args[1:]
    if name not in TOOLS:
        print(f"eagle-dist: error: unknown tool {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOLS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
