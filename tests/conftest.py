"""Shared test set-up: tests run on CPU, with few threads so parallel processes do not fight.

Layout: unit/ (one module, in process, seconds), parity/ (against the official code's recorded
outputs), integration/ (the tools end to end in one process: train, evaluate, predict, bench,
faults), distributed/ (real launchers: torchrun, accelerate, DeepSpeed, Slurm).  Helpers that
several folders use live in helpers.py (importable: this file puts tests/ on sys.path) and as
fixtures here; the harnesses (train_harness.py, toy_train.py) are scripts in this folder.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import torch  # noqa: E402

import eagle_dist  # noqa: E402,F401  (torchvision shim before anything imports timm)
import helpers  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def python_exe():
    return sys.executable


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Tiny synthetic train (24) / val (10) shards, as the two overrides that point a run at them."""
    folders = helpers.synthetic_shards(tmp_path_factory.mktemp("synthetic"), {"train": 24, "val": 10}, per_shard=7)
    return [f"data.train_shards={folders['train']}", f"data.val_shards={folders['val']}"]


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables in the environment (an in-process world of one); torch's thread
    count restored afterwards.  Yields the monkeypatch so a test can set its own."""
    threads = torch.get_num_threads()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION",
                "ACCELERATE_DYNAMO_BACKEND", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def solo_dist():
    """A one-process world (gloo) for the tests of one module; torch's thread count restored."""
    from eagle_dist import distributed

    threads = torch.get_num_threads()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        assert key not in os.environ, f"{key} leaked into the test process"
    state = distributed.setup(strategy="ddp", cpu_threads=1)
    yield state
    state.cleanup()
    torch.set_num_threads(threads)
