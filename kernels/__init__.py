"""Triton kernels, installed as `qtune.kernels` (never as a top-level `kernels`: see DESIGN.md).

Pure functions of tensors: imports only torch and triton.
"""
