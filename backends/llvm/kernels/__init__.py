"""Kernel builders of the LLVM backend: each adds one host-tuned function for one node shape to a module.

conv.py and matmul.py hold the register-tiled GEMM family (conv2d forward / grad_input / grad_filter,
dense, matmul) built on one microkernel generator (matmul.emit_tile) with fused epilogues."""
