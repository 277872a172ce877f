"""Command-line glue shared by the `python -m gemma_fusion.X` entry points."""
