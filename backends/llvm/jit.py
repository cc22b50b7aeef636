"""Host target, optimization pipeline and JIT for the LLVM backend.

One place decides what machine we generate code for (CPU name + feature string, so a VM that reports a
stand-in CPU name still gets its real vector units) and how modules are optimized (LLVM's new pass
manager at O3; the legacy PassManagerBuilder is gone from recent LLVM).
"""
from __future__ import annotations

import functools
import hashlib
import os
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


def cache_dir() -> str | None:
    """Where compiled objects are cached: $GRAPHCNN_CACHE, else ~/.cache/graphcnn/jit; '0' disables."""
    d = os.environ.get("GRAPHCNN_CACHE")
    if d == "0":
        return None
    return d or os.path.join(os.path.expanduser("~"), ".cache", "graphcnn", "jit")


def cache_key(llvm_ir: str, opt: int) -> str:
    """Hash of everything the machine code depends on: the IR, the target, the LLVM version."""
    t = host_target()
    h = hashlib.sha256()
    for part in (llvm_ir, t.triple, t.cpu, t.features, str(opt), llvm.llvm_version_info.__repr__(),
                 getattr(llvm, "__version__", "")):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class JitModule:
    """An optimized module loaded into an MCJIT engine; keeps the engine alive while in use.

    Compiled machine code is cached on disk keyed by cache_key(): a warm start skips the O3 pipeline
    and code generation (`cache_hit` tells which happened)."""

    def __init__(self, llvm_ir: str, opt: int = 3):
        tm = target_machine(opt)
        folder = cache_dir()
        path = os.path.join(folder, cache_key(llvm_ir, opt) + ".o") if folder else None
        cached = None
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    cached = f.read()
            except OSError:
                cached = None
        self.cache_hit = cached is not None
        if cached is not None:
            self.module = llvm.parse_assembly(llvm_ir)
            self.module.triple = tm.triple
            self.module.data_layout = str(tm.target_data)
        else:
            self.module = optimize(llvm_ir, opt, tm)
        self._ir_text = None
        self.engine = llvm.create_mcjit_compiler(self.module, tm)

        def notify(module, buffer):
            if path and cached is None:
                try:
                    os.makedirs(folder, exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(buffer)
                    os.replace(tmp, path)
                except OSError:
                    pass        # a read-only cache folder only costs speed

        self.engine.set_object_cache(notify, lambda module: cached)
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
