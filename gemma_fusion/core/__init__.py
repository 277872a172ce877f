"""The bottom layer: errors, atomic files, Hydra glue, the batch contract. Imports nothing else of gemma_fusion."""
