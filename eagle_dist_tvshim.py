"""Run eagle_dist's torchvision shim before the first ``import torchvision`` of any process.

CPU environments made by ``make install`` get a one-line ``eagle_dist_tvshim.pth`` in
site-packages that calls ``activate()``.  That matters for programs we do not control which
import timm (and so torchvision) before eagle_dist, such as the ``accelerate`` console script;
without it, ``accelerate launch`` dies on a CPU torch whose torchvision wheel is CUDA-linked.

It costs nothing at start-up: it only puts a finder on ``sys.meta_path`` that waits for
``torchvision`` to be imported, then runs ``eagle_dist.compat.install()`` and steps aside.
"""

import sys


class _TorchvisionFinder:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        compat = sys.modules.get("eagle_dist.compat")
        if compat is not None and not hasattr(compat, "install"):
            # eagle_dist.compat is itself being imported (torch probes for torchvision while it
            # loads); it runs install() as soon as it is ready, so stay out of the way.
            return None
        sys.meta_path.remove(self)
        try:
            from eagle_dist import compat

            compat.install()
        except ImportError:  # eagle_dist was uninstalled: behave as if we were not here
            pass
        return None  # the regular finders import torchvision itself


def activate() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
