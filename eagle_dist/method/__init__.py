"""EAGLE itself: the frozen ViT featurizer, heads, probes, EiCue, eigensolvers and losses.

`eagle.py` ties them together (EagleHeads, the optimizer's parameter groups, the training-step
losses).  Nothing here knows about ranks, files or launchers.
"""
