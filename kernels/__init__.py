"""Triton kernels of fastweight, installed as ``fastweight.kernels``.

Only ``@triton.jit`` functions live here; launchers, options and autograd are in ``fastweight.ops``.
Importing this package requires Triton; ``fastweight.ops`` imports it lazily, only on the Triton backend.
"""
