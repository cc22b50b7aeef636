"""Kernel builders of the LLVM backend: each adds one host-tuned function for one node shape to a module
(signature `void name(ptr inputs..., ptr out, i64 n)`, n = runtime batch size).

builder.py is the one builder core every kernel uses (`KernelBuilder`: function factory, folded index
arithmetic, `for_range` loops, vector strips with masked tails, scratch, and the one math library —
exp/log/sigmoid/tanh/activations — so fused epilogues and standalone kernels run the same code).
matmul.py holds the register-tiled GEMM microkernel, its planner and fused epilogues, and the dense /
matmul builders; conv.py expresses conv2d forward / grad_input / grad_filter through the same
microkernel. Memory-bound ops live in their own modules (elementwise, pooling, loss, optimizer)."""
