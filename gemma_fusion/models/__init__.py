"""Models: the frozen backbone, the projectors, and the FusionModel that joins them."""
