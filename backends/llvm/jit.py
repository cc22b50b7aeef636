"""Code-generation target, optimization pipeline and JIT for the LLVM backend.

One place decides what machine we generate code for: a `HostTarget` (triple, CPU name, feature string and
the vector width the kernels use). `host_target()` is the JIT's target: the host CPU, or what the
environment forces (`GRAPHCNN_CPU`, `GRAPHCNN_CPU_FEATURES`, e.g. an AVX2 baseline on an AVX-512 host, so
both code paths can be tested on one machine). `make_target(cpu, features)` describes any x86-64 CPU for
code that is only emitted (assembly, objects, portable `.so` files), never run here. Modules are optimized
with LLVM's new pass manager at O3 (the legacy PassManagerBuilder is gone from recent LLVM).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import stat
import struct
import tempfile
import warnings
from dataclasses import dataclass

import llvmlite.binding as llvm

CPU_ENV = "GRAPHCNN_CPU"
FEATURES_ENV = "GRAPHCNN_CPU_FEATURES"
# An x86-64 feature string: comma-separated +name / -name entries (names as LLVM spells them).
_FEATURE = re.compile(r"[+-][a-z0-9][a-z0-9_.-]*")
_CPU_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


class TargetError(ValueError):
    """A CPU name or feature string LLVM does not accept, or one the host cannot run."""


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

    def has(self, feature: str) -> bool:
        """Whether the feature string switches `feature` on (e.g. 'avx512vnni'); a CPU name's implied
        features are not consulted, so a target given only by name reports False (the safe answer)."""
        return feature in _enabled(self.features)

    def describe(self) -> str:
        """One line naming the target, e.g. 'x86_64-unknown-linux-gnu, cpu znver4, 512-bit vectors'."""
        extra = f", features {self.features}" if self.features else ""
        return f"{self.triple}, cpu {self.cpu}{extra}, {self.vector_bits}-bit vectors"


def _initialize() -> None:
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
    except Exception as e:  # pragma: no cover - depends on the host
        raise RuntimeError(f"LLVM has no usable native target on this host: {e}") from e


@contextlib.contextmanager
def _captured_stderr():
    """Collect what native code writes to file descriptor 2 (LLVM's 'not a recognized processor/feature'
    warnings) into a list of lines available after the block."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


# A 16-float add: one zmm instruction with 512-bit vectors, two ymm with 256, four xmm with 128. The
# attributes ask for the widest registers the features allow (some CPUs' tuning prefers 256 bits, and
# every kernel sets "prefer-vector-width" from the width found here).
_WIDTH_PROBE = """
define void @probe(ptr %a, ptr %b) #0 {
  %x = load <16 x float>, ptr %a
  %y = load <16 x float>, ptr %b
  %c = fadd <16 x float> %x, %y
  store <16 x float> %c, ptr %a
  ret void
}
attributes #0 = { "prefer-vector-width"="512" "min-legal-vector-width"="512" }
"""


def _check_names(cpu: str, features: str) -> None:
    if not isinstance(cpu, str) or not _CPU_NAME.fullmatch(cpu):
        raise TargetError(f"cpu must be an LLVM CPU name such as 'x86-64-v3' or 'skylake', got {cpu!r}")
    if not isinstance(features, str) or (features and not all(_FEATURE.fullmatch(f) for f in features.split(","))):
        raise TargetError(f"features must be comma-separated +name/-name entries such as '+avx2,-avx512f', "
                          f"got {features!r}")


@functools.lru_cache(maxsize=32)
def make_target(cpu: str, features: str = "") -> HostTarget:
    """A target for `cpu` (an LLVM CPU name: 'x86-64-v3', 'haswell', 'znver4', ...) with `features`
    (comma-separated '+name'/'-name', applied on top of the CPU's own). The vector width is what LLVM
    really generates for that CPU (a probe function is compiled, never run). TargetError when LLVM does
    not know the CPU or a feature."""
    _check_names(cpu, features)
    _initialize()
    triple = llvm.get_process_triple()
    # LLVM only warns about an unknown CPU or feature (on stderr, when the machine is created) and then
    # aborts the process on code generation: check before emitting anything
    with _captured_stderr() as warnings:
        tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=2)
    complaints = sorted({w.strip() for w in warnings if "not a recognized" in w})
    if complaints:
        raise TargetError(f"LLVM does not accept cpu {cpu!r} / features {features!r} for {triple}: "
                          + "; ".join(complaints))
    mod = llvm.parse_assembly(_WIDTH_PROBE)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    asm = tm.emit_assembly(mod)
    bits = 512 if "zmm" in asm else 256 if "ymm" in asm else 128
    return HostTarget(triple, cpu, features, bits)


def _host_features() -> str:
    return llvm.get_host_cpu_features().flatten()


def _enabled(features: str) -> set[str]:
    """Names switched on by a feature string (later entries win)."""
    on: set[str] = set()
    for f in filter(None, features.split(",")):
        (on.add if f[0] == "+" else on.discard)(f[1:])
    return on


@functools.lru_cache(maxsize=1)
def host_target() -> HostTarget:
    """The JIT's target (cached): the host CPU with its feature string, so a VM that reports a stand-in
    CPU name still gets its real vector units. `GRAPHCNN_CPU` replaces the CPU name (its own features then
    apply, not the host's) and `GRAPHCNN_CPU_FEATURES` adds '+x'/'-x' entries, e.g. '-avx512f' runs the
    whole backend with AVX2 code on an AVX-512 host. Code for features the host lacks is refused here
    (it would die of SIGILL). RuntimeError if LLVM has no native target on this host."""
    _initialize()
    try:
        host_cpu = llvm.get_host_cpu_name()
        host_features = _host_features()
    except Exception as e:  # pragma: no cover - depends on the host
        raise RuntimeError(f"LLVM has no usable native target on this host: {e}") from e
    cpu = os.environ.get(CPU_ENV, "").strip() or None
    extra = os.environ.get(FEATURES_ENV, "").strip()
    if cpu is None and not extra:
        return make_target(host_cpu, host_features)
    try:
        _check_names(cpu or host_cpu, extra)
    except TargetError as e:
        raise TargetError(f"${CPU_ENV}/${FEATURES_ENV}: {e}") from None
    base = "" if cpu else host_features
    features = ",".join(filter(None, [base, extra]))
    try:
        target = make_target(cpu or host_cpu, features)
    except TargetError as e:
        raise TargetError(f"${CPU_ENV}/${FEATURES_ENV}: {e}") from None
    missing = sorted(_enabled(extra) - _enabled(host_features))
    if missing:
        raise TargetError(f"${FEATURES_ENV}={extra!r} enables {', '.join(missing)}, which this host "
                          f"({host_cpu}) lacks; the JIT only runs code the host supports")
    if target.vector_bits > make_target(host_cpu, host_features).vector_bits:
        raise TargetError(f"${CPU_ENV}={cpu!r} uses {target.vector_bits}-bit vectors, wider than this host's; "
                          f"the JIT only runs code the host supports")
    return target


def export_target(cpu: str | None = None, features: str | None = None) -> HostTarget:
    """The target of an ahead-of-time build (`graphcnn compile --cpu/--features`): cpu None or 'host' is
    the JIT's target (host_target()) with `features` appended; any other LLVM CPU name ('x86-64-v3' for
    a portable AVX2 baseline) uses that CPU's own features plus `features`. Unlike host_target(), CPUs
    newer than the host are allowed (the code is only emitted here). TargetError for bad names."""
    extra = (features or "").strip()
    if cpu is None or cpu.strip() in ("", "host"):
        base = host_target()
        if not extra:
            return base
        _check_names(base.cpu, extra)
        return make_target(base.cpu, ",".join(filter(None, [base.features, extra])))
    return make_target(cpu.strip(), extra)


def target_machine(opt: int = 3, reloc: str = "default", jit: bool = True,
                   target: HostTarget | None = None) -> llvm.TargetMachine:
    """A new TargetMachine for `target` (default: host_target()); reloc='pic' for objects linked into
    shared libraries. Not cached: an MCJIT engine takes ownership of its TargetMachine and frees it."""
    t = target or host_target()
    return llvm.Target.from_triple(t.triple).create_target_machine(
        cpu=t.cpu, features=t.features, opt=opt, reloc=reloc, codemodel="jitdefault" if jit else "default",
        jit=jit)


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


def compile_object(llvm_ir: str, opt: int = 3, target: HostTarget | None = None) -> bytes:
    """Relocatable machine code of one module for the JIT (JitModule objects): optimize() then code
    generation with the JIT's target machine settings (default target: host_target()). Used in-process
    and by compile_pool's workers alike, so a kernel's object does not depend on where it was built."""
    tm = target_machine(opt, target=target)
    return bytes(tm.emit_object(optimize(llvm_ir, opt, tm)))


class JitCacheWarning(RuntimeWarning):
    """The JIT cache was not used for an entry or a folder (damaged entry, unsafe folder); compilation
    went ahead without it."""


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


# -- the on-disk cache: machine code is only ever loaded from a verified entry in a private folder ----
# An entry is ENTRY_MAGIC | key (64 ASCII hex) | object length (u64 LE) | SHA-256 of all before it plus
# the object | the object. A truncated, zeroed, bit-flipped or renamed entry fails the check, is
# deleted and recompiled (LLVM aborts the process on a damaged object, so it must never see one).
ENTRY_MAGIC = b"GCNNJIT\x01"
ENTRY_SUFFIX = ".gcjit"
MAX_ENTRY_BYTES = 1 << 30
_HEADER = struct.Struct("<8s64sQ32s")
_refused_folders: set = set()


def _warn(msg: str) -> None:
    warnings.warn(msg, JitCacheWarning, stacklevel=3)


def _entry_digest(key: str, obj: bytes) -> bytes:
    return hashlib.sha256(ENTRY_MAGIC + key.encode("ascii") + struct.pack("<Q", len(obj)) + obj).digest()


def _private(st) -> bool:
    """Owned by this user and writable by no one else (where the OS has users)."""
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def trusted_cache_dir() -> str | None:
    """cache_dir(), created private (0700) if missing, when code may be loaded from it: a real
    directory owned by this user and not group/world-writable. Otherwise None with one warning per folder
    (compilation proceeds uncached; nothing is read from or written to a folder others could plant
    code in)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass                    # a file in the way is refused below; an uncreatable folder only costs speed
    try:
        st = os.lstat(folder)
    except OSError:
        return None             # e.g. a read-only home: nothing can be planted there
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink or a file)"
    elif not _private(st):
        problem = (f"is writable by other users or not owned by you (mode {stat.S_IMODE(st.st_mode):o}); "
                   f"run `chmod 700 {folder}` if it is yours")
    else:
        return folder
    if folder not in _refused_folders:
        _refused_folders.add(folder)
        _warn(f"graphcnn JIT cache {folder!r} {problem}: compiling without the cache "
              f"(set GRAPHCNN_CACHE to a private folder, or to 0 to silence this)")
    return None


def read_cache_entry(folder: str, key: str) -> bytes | None:
    """The verified object cached under `key`, or None. A damaged or foreign entry is deleted with a
    JitCacheWarning, never returned."""
    path = os.path.join(folder, key + ENTRY_SUFFIX)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:            # a symlink (ELOOP), unreadable, ...: not ours to load
        problem = f"cannot be opened safely ({e.strerror})"
    else:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or not _private(st):
                problem = "is not a private regular file"
            elif st.st_size > MAX_ENTRY_BYTES:
                problem = f"is {st.st_size} bytes (limit {MAX_ENTRY_BYTES})"
            else:
                data = f.read(MAX_ENTRY_BYTES + 1)
                problem = _entry_problem(data, key)
                if problem is None:
                    return data[_HEADER.size:]
    _warn(f"graphcnn JIT cache entry {path!r} {problem}: deleted, recompiling")
    try:
        os.unlink(path)
    except OSError:
        pass
    return None


def _entry_problem(data: bytes, key: str) -> str | None:
    """What is wrong with an entry's bytes, or None when it holds a verified object for `key`."""
    if len(data) < _HEADER.size:
        return f"is truncated ({len(data)} bytes)"
    magic, stored_key, length, digest = _HEADER.unpack_from(data)
    if magic != ENTRY_MAGIC:
        return "has no graphcnn JIT header (damaged or not written by this graphcnn)"
    if stored_key != key.encode("ascii"):
        return "holds the code of another key"
    obj = data[_HEADER.size:]
    if len(obj) != length:
        return f"is truncated or padded ({len(obj)} object bytes, header says {length})"
    if _entry_digest(key, obj) != digest:
        return "does not match its SHA-256 digest (corrupted)"
    return None


def write_cache_entry(folder: str, key: str, obj: bytes) -> None:
    """Store `obj` under `key`: a private temp file renamed into place, so readers see a whole entry or
    none. Failures only cost speed next time, so they are ignored."""
    data = _HEADER.pack(ENTRY_MAGIC, key.encode("ascii"), len(obj), _entry_digest(key, obj)) + bytes(obj)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=ENTRY_SUFFIX)   # mode 0600
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, key + ENTRY_SUFFIX))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class JitModule:
    """An optimized module loaded into an MCJIT engine; keeps the engine alive while in use.

    Compiled machine code is cached on disk keyed by cache_key(): a warm start skips the O3 pipeline
    and code generation (`cache_hit` tells which happened). Only verified entries of a private folder
    are loaded (trusted_cache_dir, read_cache_entry).

    `objects`: the machine code of separately compiled modules the main module calls (the kernels of
    codegen.KernelCache with a compile_pool.KernelCompiler, cached one entry per kernel by that compiler),
    loaded into the same engine first; `kernel_irs` is their IR, only for optimized_ir and asm."""

    def __init__(self, llvm_ir: str, opt: int = 3, objects=(), kernel_irs=()):
        self._opt, self.kernel_irs = opt, tuple(kernel_irs)
        tm = target_machine(opt)
        folder = trusted_cache_dir()
        key = cache_key(llvm_ir, opt) if folder else None
        cached = read_cache_entry(folder, key) if folder else None
        self.cache_hit = cached is not None
        if cached is not None:
            self.module = llvm.parse_assembly(llvm_ir)
            self.module.triple = tm.triple
            self.module.data_layout = str(tm.target_data)
        else:
            self.module = optimize(llvm_ir, opt, tm)
        self._ir_text = None
        self.engine = llvm.create_mcjit_compiler(self.module, tm)
        for obj in objects:
            self.engine.add_object_file(llvm.ObjectFileRef.from_data(bytes(obj)))

        def notify(module, buffer):
            if folder and cached is None:
                write_cache_entry(folder, key, buffer)

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

    def global_address(self, name: str) -> int:
        """Address of a (non-internal) global variable; KeyError if the module has none of that name."""
        addr = self.engine.get_global_value_address(name)
        if not addr:
            raise KeyError(f"JIT module has no global named {name!r}")
        return addr

    @property
    def optimized_ir(self) -> str:
        """The optimized IR of the main module and of every kernel module (kernels are re-optimized here:
        only their machine code is kept)."""
        return "\n".join([str(self.module)] + [str(optimize(t, self._opt)) for t in self.kernel_irs])

    @property
    def asm(self) -> str:
        """Assembly of the main module and of every kernel module."""
        kernels = [self._tm.emit_assembly(optimize(t, self._opt, self._tm)) for t in self.kernel_irs]
        return "\n".join([self._tm.emit_assembly(self.module)] + kernels)
