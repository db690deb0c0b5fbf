"""Triton kernels and their launchers, one module per op family (imported as pyvision_ops.kernels)."""
