"""Inference: generation (and later export, planning, quantisation)."""
