"""torchrun for eagle-dist: torch's launcher, except that it leaves the stop signals to the workers.

    python launch/torchrun.py --nproc_per_node 8 launch/train.py --config configs/cocostuff27.yaml
    python launch/torchrun.py --nnodes N --nproc_per_node G --rdzv_backend c10d \\
        --rdzv_endpoint HOST:PORT launch/train.py ...

Takes torchrun's arguments.  SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 go on to the workers, which
save a checkpoint at the next step boundary and exit 0; torchrun then exits 0 as well, where a
plain torchrun would shut the workers down itself (killing them after 30 s) and end with a
SignalException traceback.  launch/slurm/train.sbatch starts this.  See
eagle_dist.distributed.run_torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from eagle_dist.distributed import run_torchrun  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
