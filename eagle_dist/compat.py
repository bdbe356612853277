"""Make ``import timm`` work on a CPU-only torch whose torchvision wheel is CUDA-linked.

Why this exists: on some machines the only torchvision wheel matching the installed torch was
built against CUDA.  Its compiled extension (``torchvision/_C.so``) cannot load, and importing
torchvision then fails inside ``torchvision/_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``, because that file registers fake
(meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally.  timm imports
torchvision, so the whole model stack would be unusable.

What it does: ``install()`` runs once, from ``eagle_dist/__init__.py``, before anything imports
torchvision.  It tries to load torchvision's compiled extension exactly as torchvision would.
If that works (the normal case on a matching install, and on every GPU machine) it does nothing.
If it fails, it defines the two operator schemas (no kernels) in the ``torchvision`` namespace so
that those fake-kernel registrations succeed and torchvision imports.  The compiled ops
(nms, roi_align, deform_conv2d, ...) stay unavailable and raise torchvision's own "Couldn't load
custom C++ ops" error when called; eagle-dist uses none of them.  Images are decoded with Pillow, never with ``torchvision.io``.

``STATE`` records what happened ("native", "shimmed", "absent") for tests and bug reports.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

STATE = "not-installed"
_LIBRARY = None  # keep the Library object alive: dropping it unregisters the schemas


def _native_extension_loads() -> bool | None:
    """True/False whether torchvision's _C loads; None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def install() -> str:
    """Install the fallback if (and only if) torchvision's compiled ops cannot load."""
    global STATE, _LIBRARY
    if STATE != "not-installed":
        return STATE
    STATE = "installing"  # re-entrant calls (our own find_spec probe can trigger one) return here
    if "torchvision" in sys.modules:
        STATE = "native"  # someone imported it successfully before us: nothing to fix
        return STATE
    if hasattr(torch.ops.torchvision, "nms"):
        STATE = "native"  # the compiled ops (or an earlier shim) are already registered
        return STATE
    loads = _native_extension_loads()
    if loads is None:
        STATE = "absent"
        return STATE
    if loads:
        STATE = "native"
        return STATE
    # Schemas only, no kernels: torchvision's Python wrappers check for the compiled ops
    # themselves and raise their own clear error if one of them is ever called.
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    STATE = "shimmed"
    return STATE
