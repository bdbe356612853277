"""What many test files need: the tiny training config, a free port, the launched ranks'
environment, tiny synthetic shards.  tests/conftest.py puts this folder on sys.path, so any
test (and the harnesses, which run as scripts from here) can `import helpers`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A 2-process run of this takes seconds of compute: a tiny random ViT at 64 px, batch 2.
# TINY_SIZES has no label setting (an unlabeled config adds model.n_clusters=K instead).
TINY_SIZES = [
    "model.backbone=vit_tiny_patch16_224", "model.dim=32",
    "model.eigen_clusters=6", "loss.feature_samples=4", "loss.neg_samples=2", "loss.step_schedulers=2",
    "data.resolution=64", "data.val_resolution=64", "data.batch_size=2", "data.val_batch_size=3",
    "data.num_workers=1", "data.shuffle_buffer=8", "train.log_interval=1", "train.eval_interval=2",
    "train.ckpt_interval=2",
]
TINY = [*TINY_SIZES, "model.n_classes=4", "model.extra_clusters=1"]


def fixture_dir(env: str, name: str) -> Path:
    """A recorded-fixture folder: $env if set (relative to the checkout), else ../shared/fixtures/<name>."""
    configured = os.environ.get(env)
    if not configured:
        return (REPO / ".." / "shared" / "fixtures" / name).resolve()
    path = Path(configured)
    return path if path.is_absolute() else (REPO / path).resolve()


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    """Fail with both output tails unless the finished process exited 0."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def mean_over_ranks(d, value) -> float:
    """Mean of a scalar (float or 0-d tensor) over the ranks of Dist `d`; a collective."""
    import torch

    t = torch.as_tensor(value, dtype=torch.float64).detach().to(d.device).reshape(1).clone()
    return float(d.all_reduce_sum(t).item()) / d.world_size


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launched ranks: one thread each, the checkout importable, no tracking server."""
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("ACCELERATE_", "MLFLOW_", "SLURM_"))] + [
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    ]:
        env.pop(key, None)  # the launcher under test must be the only source of these
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_ok(cmd: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` from the checkout; fail the test with both output tails unless it exits 0."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=launch_env(**env), cwd=REPO)
    assert out.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-6000:]}"
    return out


def synthetic_shards(root: Path, counts: dict[str, int], per_shard: int, classes: int = 4,
                     size: str = "48x64") -> dict[str, Path]:
    """Synthetic shard folders root/<split> with counts[split] images; returns {split: folder}."""
    from eagle_dist.cli import shard

    for split, count in counts.items():
        shard.main([
            "--source", "synthetic", "--split", split, "--out", str(root / split), "--synthetic-count", str(count),
            "--synthetic-size", size, "--synthetic-classes", str(classes), "--samples-per-shard", str(per_shard),
            "--quiet", "--workers", "1",
        ])
    return {split: root / split for split in counts}
