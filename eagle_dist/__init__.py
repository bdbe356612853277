"""eagle-dist: distributed training of EAGLE (CVPR 2024) unsupervised semantic segmentation.

Importing the package installs a small torchvision compatibility layer first (see
``eagle_dist.compat``) so that timm works on CPU-only torch installs.
"""

from eagle_dist import compat as _compat

_compat.install()

__version__ = "0.1.0"
