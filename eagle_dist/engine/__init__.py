"""Training: the Trainer (one step as a unit, the loop around it) and experiment tracking."""
