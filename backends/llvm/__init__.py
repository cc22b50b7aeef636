"""LLVM backend: llvmlite code generation, host-tuned, JIT-compiled or emitted as objects."""
from .executable import LlvmExecutable, compile_llvm

__all__ = ["LlvmExecutable", "compile_llvm"]
