"""dist.cpu_allocator: CPU runs keep freed host memory instead of faulting it in every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eagle_dist import distributed as dist_mod
from eagle_dist.config import ConfigError, load_config

# Allocates and frees a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) eight times
# and prints the page faults of each round.
_ROUNDS = """
import resource, sys, torch
from eagle_dist.distributed import keep_freed_host_memory
if sys.argv[1] == "reuse":
    assert keep_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    before = faults()
    torch.ones(16 << 20)
    print(faults() - before)
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_keeps_large_freed_blocks_instead_of_faulting_them_in_again():
    system, reuse = _faults("system"), _faults("reuse")
    # The C library's default maps fresh pages every round (16 Ki pages of 4 KiB) ...
    assert min(system) > 4000
    # ... with reuse the heap settles within a few rounds, then no round faults any more.
    assert max(reuse[4:]) < 100


def test_the_allocator_setting_is_checked_where_it_is_given():
    assert load_config(None, []).dist.cpu_allocator == "reuse"
    assert load_config(None, ["dist.cpu_allocator=system"]).dist.cpu_allocator == "system"
    with pytest.raises(ConfigError, match="cpu_allocator"):
        load_config(None, ["dist.cpu_allocator=jemalloc"])
    with pytest.raises(dist_mod.DistributedSetupError, match="cpu_allocator"):
        dist_mod.setup(cpu_allocator="jemalloc", cpu_threads=1)
