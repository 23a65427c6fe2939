"""The numerics of the passes: least squares, statistics over calibration batches, plans
and allocations, low-rank and cheap-kernel fits. numpy and scipy only: nothing here reads a
graph or runs a model."""
