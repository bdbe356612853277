"""`eagle-dist checkpoint` (also `python -m eagle_dist.checkpoint`): what a run's checkpoints hold.

    eagle-dist checkpoint runs/<name>/checkpoints      # list: complete, incomplete, temporary, damaged
    eagle-dist checkpoint verify runs/<name>           # every file against its recorded size and sha256
    eagle-dist checkpoint verify runs/<name>/checkpoints/step-00000500

verify exits 1 when a checkpoint is damaged, 0 otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from eagle_dist.checkpoint import (
    DAMAGED_PREFIX,
    MARKER,
    STEP_DIR_RE,
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointError,
    is_complete,
    read_state,
    verify_checkpoint,
)


def _checkpoints_in(target: Path) -> tuple[Path, list[Path]]:
    """(root, step folders) for a run folder, its checkpoints folder, or one step folder."""
    if STEP_DIR_RE.fullmatch(target.name) or (target / MARKER).is_file():
        return target.parent, [target]
    root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    return root, sorted(p for p in root.iterdir() if STEP_DIR_RE.fullmatch(p.name) and p.is_dir())


def _list(root: Path) -> int:
    for child in sorted(root.iterdir()):
        if STEP_DIR_RE.fullmatch(child.name):
            if is_complete(child):
                state = read_state(child)
                print(f"{child.name}  complete  world_size={state['world_size']}  strategy={state['strategy']}")
            else:
                print(f"{child.name}  INCOMPLETE (ignored)")
        elif child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            print(f"{child.name}  temporary (removed by the next save)")
        elif child.name.startswith(DAMAGED_PREFIX):
            print(f"{child.name}  damaged, moved aside (kept for you to inspect or delete)")
    return 0


def _verify_cli(target: Path) -> int:
    root, folders = _checkpoints_in(target)
    if not folders:
        print(f"no step folders in {root}", file=sys.stderr)
        return 1
    damaged = 0
    for folder in folders:
        if not is_complete(folder):
            print(f"{folder.name}  INCOMPLETE (no {MARKER} marker; never used)")
            continue
        t0 = time.perf_counter()
        try:
            checked = verify_checkpoint(folder)
        except CheckpointError as err:
            damaged += 1
            print(f"{folder.name}  DAMAGED: {str(err).split(': ', 1)[-1]}")
            continue
        if not checked:
            print(f"{folder.name}  unchecked (saved before checkpoints recorded digests)")
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        seconds = time.perf_counter() - t0
        print(f"{folder.name}  ok  {size / 1e6:.1f} MB in {seconds:.2f} s")
    return 1 if damaged else 0


def main(argv: list[str] | None = None) -> int:
    """`[list] FOLDER`: what is there; `verify RUN_OR_STEP`: check digests (exit 1 if damaged)."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if len(args) == 2 and args[0] in ("list", "verify") else "list"
    if len(args) == 2 and command == args[0]:
        args = args[1:]
    if len(args) != 1:
        print("usage: eagle-dist checkpoint [list] runs/<name>/checkpoints\n"
              "       eagle-dist checkpoint verify runs/<name> | runs/<name>/checkpoints/step-XXXXXXXX",
              file=sys.stderr)
        return 2
    target = Path(args[0])
    if not target.is_dir():
        print(f"no such folder: {target}", file=sys.stderr)
        return 2
    return _verify_cli(target) if command == "verify" else _list(target)
