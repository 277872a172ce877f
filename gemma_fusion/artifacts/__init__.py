"""Run directories and exports: every path of a run, saving and loading them (`RunDir`, `load_for_inference`)."""
