"""Tensor-train math, as plain functions of a list of cores (tensorly's conventions).

`cores` builds, initialises and contracts trains; `rounding` orthogonalises them and cuts
bond ranks with two-site SVD sweeps whose error is exactly the discarded singular values.
Nothing here knows about models, optimizers or files: every later stage builds on it.
"""
