"""LLVM backend: llvmlite code generation, host-tuned, JIT-compiled or emitted as objects."""
