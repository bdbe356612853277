"""Runs the real Trainer under any launcher and dumps what the tests compare.

    torchrun --nproc_per_node 2 tests/train_harness.py OUT [key=value ...]

Like launch/train.py, plus: every rank writes OUT/rank{R}.pt (its final head weights as the
rank sees them) and rank 0 writes OUT/summary.json (final summary, MLflow run id, run folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import eagle_dist  # noqa: E402,F401
import torch  # noqa: E402

from eagle_dist.config import load_config  # noqa: E402
from eagle_dist.engine.trainer import Trainer  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    cfg = load_config(REPO / "configs" / "default.yaml", sys.argv[2:])
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
        out.mkdir(parents=True, exist_ok=True)
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
