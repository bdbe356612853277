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


def _relaunch_embedded_default(overrides: list[str]) -> int | None:
    """Exit code of a 2-process torchrun of the embedded default, or None to run here."""
    import os
    import signal
    import subprocess

    import torch

    from eagle_dist.distributed import detect_launch

    info = detect_launch()
    if info.world_size != 1 or info.promised_min_world_size != 1 or torch.cuda.is_available():
        return None
    if (os.cpu_count() or 1) < 2 or os.environ.get("EAGLE_NO_RELAUNCH"):
        return None
    print("eagle-dist: embedded default on CPU: starting 2 processes with torchrun "
          "(set EAGLE_NO_RELAUNCH=1 to stay in one process)", flush=True)
    # Ctrl-C: torchrun starts each worker in a session of its own, so a terminal's SIGINT reaches
    # only this process and torchrun. torchrun's own handling (forward, wait 30 s, SIGKILL, exit
    # with a SignalException traceback) is switched off: it ignores SIGINT, and this process
    # forwards each Ctrl-C to the workers' process groups. The workers decide (first: save and
    # exit 0; second: stop at once) and torchrun exits as they do.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT",
           str(Path(__file__).resolve()), "--config", str(REPO / "configs" / "default.yaml"), *overrides]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by torchrun (and its workers
    try:                                                     # until the trainer installs its handler)
        agent = subprocess.Popen(cmd)
        signal.signal(signal.SIGINT, lambda *_: _forward_to_children_of(agent.pid, signal.SIGINT))
        return agent.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _forward_to_children_of(parent: int, sig: int) -> None:
    """Send `sig` to the process group of every child of `parent` (Linux /proc)."""
    import os

    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == parent:  # fields[1]: the parent pid
            try:
                os.killpg(int(stat.parent.name), sig)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--config" or a.startswith("--config=") or a in ("-h", "--help") for a in argv):
        try:  # a bad override is reported here, with exit 2, not after the relaunch
            load_config(REPO / "configs" / "default.yaml", argv)
        except ConfigError as err:
            print(f"eagle-dist: config error: {err}", file=sys.stderr)
            return 2
        code = _relaunch_embedded_default(list(argv))
        if code is not None:
            return code
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"eagle-dist: config error: {err}", file=sys.stderr)
        return 2

    from eagle_dist.errors import USER_ERRORS
    from eagle_dist.engine.trainer import Trainer, format_final_table

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
