"""Host target, optimization pipeline and JIT for the LLVM backend.

One place decides what machine we generate code for (CPU name + feature string, so a VM that reports a
stand-in CPU name still gets its real vector units) and how modules are optimized (LLVM's new pass
manager at O3; the legacy PassManagerBuilder is gone from recent LLVM).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import llvmlite.binding as llvm


@dataclass(frozen=True)
class HostTarget:
    """What the generated code may assume about the CPU."""
    triple: str
    cpu: str
    features: str
    vector_bits: int          # widest usable float vector register: 512, 256 or 128

    @property
    def vector_lanes(self) -> int:
        """float32 lanes in one vector register."""
        return self.vector_bits // 32


@functools.lru_cache(maxsize=1)
def host_target() -> HostTarget:
    """Describe the host CPU (cached). Raises RuntimeError if LLVM has no native target here."""
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        triple = llvm.get_process_triple()
        cpu = llvm.get_host_cpu_name()
        features = llvm.get_host_cpu_features().flatten()
    except Exception as e:  # pragma: no cover - depends on the host
        raise RuntimeError(f"LLVM has no usable native target on this host: {e}") from e
    feats = set(f[1:] for f in features.split(",") if f.startswith("+"))
    bits = 512 if "avx512f" in feats else 256 if "avx2" in feats or "avx" in feats else 128
    return HostTarget(triple, cpu, features, bits)


def target_machine(opt: int = 3, reloc: str = "default", jit: bool = True) -> llvm.TargetMachine:
    """A new TargetMachine for the host; reloc='pic' for objects linked into shared libraries.
    Not cached: an MCJIT engine takes ownership of its TargetMachine and frees it with itself."""
    t = host_target()
    target = llvm.Target.from_triple(t.triple)
    return target.create_target_machine(cpu=t.cpu, features=t.features, opt=opt, reloc=reloc,
                                        codemodel="jitdefault" if jit else "default", jit=jit)


def optimize(llvm_ir: str, opt: int = 3, tm: llvm.TargetMachine | None = None) -> llvm.ModuleRef:
    """Parse textual LLVM IR, verify it, and run the O`opt` new-pass-manager pipeline on it."""
    tm = tm or target_machine()
    mod = llvm.parse_assembly(llvm_ir)
    mod.verify()
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=opt)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod, pb)
    return mod


class JitModule:
    """An optimized module loaded into an MCJIT engine; keeps the engine alive while in use."""

    def __init__(self, llvm_ir: str, opt: int = 3):
        tm = target_machine(opt)
        self.module = optimize(llvm_ir, opt, tm)
        self.engine = llvm.create_mcjit_compiler(self.module, tm)
        self.engine.finalize_object()
        self.engine.run_static_constructors()
        self._tm = tm

    def address(self, name: str) -> int:
        """Address of an exported function; KeyError if the module has no such function."""
        addr = self.engine.get_function_address(name)
        if not addr:
            raise KeyError(f"JIT module has no function named {name!r}")
        return addr

    @property
    def optimized_ir(self) -> str:
        return str(self.module)

    @property
    def asm(self) -> str:
        return self._tm.emit_assembly(self.module)
