"""Backends: turn an optimized, memory-planned ir.Graph into an executable (numpy, llvm)."""
