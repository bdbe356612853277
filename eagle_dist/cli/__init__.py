"""Thin command-line tools.  Each module has `main(argv) -> exit status`; `eagle_dist.cli.main`
dispatches the `eagle-dist` console script to them.  No tool imports another tool.

Argument types that several tools share live here, so that no tool imports another.
"""

from __future__ import annotations

import argparse
import re


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for HEIGHTxWIDTH."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH (e.g. 160x224), got {text!r}")
    return int(m.group(1)), int(m.group(2))
