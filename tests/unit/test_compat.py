"""The torchvision shim: timm must import on a CPU-only torch, and the shim must be inert otherwise."""

import subprocess
import sys

from eagle_dist import compat


def test_state_is_decided():
    assert compat.STATE in ("native", "shimmed", "absent")


def test_timm_and_torchvision_import_in_a_fresh_process():
    code = (
        "import eagle_dist, timm, torchvision;"
        "from eagle_dist import compat;"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0);"
        "print(compat.STATE, type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    state, name = out.stdout.split()
    assert state in ("native", "shimmed")
    assert name == "VisionTransformer"


def test_shim_is_a_no_op_when_torchvision_was_already_imported():
    # Simulates a machine where torchvision imported fine before eagle_dist: nothing is defined.
    code = (
        "import sys, types; sys.modules['torchvision'] = types.ModuleType('torchvision');"
        "from eagle_dist import compat; print(compat.STATE, compat._LIBRARY is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", "True"]


def test_import_hook_runs_the_shim_for_programs_that_import_timm_first():
    # What the accelerate CLI does: import timm before anything of ours.  The hook (installed as
    # a .pth by `make install` on CPU machines) must run the shim before torchvision loads.
    code = (
        "import sys, eagle_dist_tvshim; eagle_dist_tvshim.activate();"
        "import timm;"
        "print('eagle_dist.compat' in sys.modules, sys.modules['eagle_dist.compat'].STATE)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, state = out.stdout.split()
    assert loaded == "True" and state in ("native", "shimmed")
