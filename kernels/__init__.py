"""Triton kernels, installed as accelops.kernels. Each module mirrors an op family and
exposes launchers with the same signatures as accelops.reference.<family>."""
