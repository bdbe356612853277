"""Evaluation: the distributed loop, metrics, DenseCRF, figures, and `inference` (load a model
from any checkpoint and segment an image), which every command-line tool shares."""
