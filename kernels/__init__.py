"""The math on tensors (installed as ``gpumerge.kernels``; never ``import kernels``, a PyPI name)."""
