"""Training: the Lightning wrapper, optimiser set-up, freezing, and the tiny backbone's text pretraining."""
