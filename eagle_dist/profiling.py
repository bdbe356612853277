"""Named timing sections of the training step, switched off unless a benchmark turns them on.

The model code marks its parts with ``with profiling.section("eicue"):``. Off (the default),
``section`` returns one shared no-op context: no clock reads, no synchronisation, no change to
what the step computes. ``python -m eagle_dist.bench step`` switches a recorder on::

    from eagle_dist import profiling
    with profiling.recording(device) as rec:
        ...one training step...
    seconds = rec.totals()        # {"backbone": 0.41, "eicue": 0.12, ...} summed per name

On CPU a section is wall-clock time (``perf_counter``). On CUDA it is the GPU time between two
CUDA events recorded on the current stream, so sections do not synchronise the step; ``totals``
synchronises once, at the end. Sections may nest (a parent's time includes its children's) and a
name may be entered several times per step (the times add up).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

__all__ = ["SectionRecorder", "recording", "section"]

_NULL = contextlib.nullcontext()
_active: "SectionRecorder | None" = None


class SectionRecorder:
    """Collects the times of named sections on one device (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._cpu_seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def section(self, name: str):
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._cpu_seconds[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per section name since the recorder was created (or last :meth:`reset`)."""
        out = dict(self._cpu_seconds)
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        return out

    def reset(self) -> None:
        self._cpu_seconds.clear()
        self._events.clear()


def section(name: str):
    """A timing section when a recorder is active; otherwise a shared no-op context."""
    recorder = _active
    return _NULL if recorder is None else recorder.section(name)


@contextlib.contextmanager
def recording(device: torch.device | str = "cpu"):
    """Activate a fresh :class:`SectionRecorder` for the ``with`` block (not re-entrant)."""
    global _active
    if _active is not None:
        raise RuntimeError("profiling.recording is already active; nest sections, not recorders")
    _active = SectionRecorder(device)
    try:
        yield _active
    finally:
        _active = None
