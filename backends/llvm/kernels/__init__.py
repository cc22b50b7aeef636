"""Kernel builders of the LLVM backend: each adds one host-tuned function for one node shape to a module
(signature `void name(ptr inputs..., ptr out, i64 n)`, n = runtime batch size).

matmul.py holds the IR plumbing (KernelContext), the register-tiled GEMM microkernel, its planner and
fused epilogues, and the dense / matmul builders; conv.py expresses conv2d forward / grad_input /
grad_filter through the same microkernel. Memory-bound ops live in their own modules (pointwise,
pooling)."""
