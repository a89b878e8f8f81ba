"""Triton kernels and their launchers. Nothing here knows about autograd."""
