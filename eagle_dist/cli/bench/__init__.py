"""Benchmarks: the training step with a breakdown, the EiCue eigensolvers, the data stream, and
the prepared GPU check.

    python -m eagle_dist.bench step [key=value ...] [--json step.json]      # bench/step.py
    python -m eagle_dist.bench eigen [--batch 16] [--json eigen.json]       # bench/eigen.py
    python -m eagle_dist.bench data [--count 200] [--json data.json]        # bench/data.py
    python -m eagle_dist.bench gpu --json gpu.json [--dry-run]              # bench/gpu.py
    python -m eagle_dist.bench components [--official-python PY] [--json c.json]  # bench/components.py
    eagle-dist bench ...                                                    # the same

Every benchmark calls the library (`build_model`, `engine.step.run_step`), never a copy of it;
synth.py holds the synthetic inputs they share.
"""

from __future__ import annotations

import sys

from eagle_dist.cli.bench import components, data, eigen, gpu, step

COMMANDS = {"step": step.main, "eigen": eigen.main, "data": data.main, "gpu": gpu.main,
            "components": components.main}

USAGE = """usage: python -m eagle_dist.bench {step,eigen,data,gpu,components} [options]

  step    time the full training step with a breakdown      (python -m eagle_dist.bench step --help)
  eigen   compare EiCue eigensolvers (speed and accuracy)   (python -m eagle_dist.bench eigen --help)
  data    shard build and stream throughput                 (python -m eagle_dist.bench data --help)
  gpu     the prepared GPU check, one JSON                   (python -m eagle_dist.bench gpu --help)
  components  InfoNCE and correspondence, ours vs official   (python -m eagle_dist.bench components --help)"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown benchmark {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return int(COMMANDS[command](rest) or 0)
