"""NumPy backend: generated Python source calling vectorized kernels — the portable fallback."""
from .executable import NumpyExecutable, compile_numpy

__all__ = ["NumpyExecutable", "compile_numpy"]
