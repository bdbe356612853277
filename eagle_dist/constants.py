"""Numbers every floor of the package shares (data, method, evaluation): defined here only.

    from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD
"""

# The per-channel normalisation the DINO / DINOv2 backbones were trained with: the data stream
# applies it, EiCue's colour graph and the figures undo it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
