"""Native export: an optimized inference graph -> NAME.so / NAME.h (+ NAME.o, NAME.ll, NAME.s).

The shared library needs no Python: weights and constants are compiled in as read-only globals, and a
small C API wraps the graph's entry function (backends/llvm/codegen.py):

    size_t NAME_workspace_size(int64_t batch);          exact bytes, 0 if batch is out of range
    int    NAME_predict(const float *input, int64_t batch, float *output, void *workspace);
    int    NAME_predict_checked(const float *input, int64_t batch, float *output,
                                void *workspace, size_t workspace_bytes);

`predict` aligns the workspace up to 64 bytes, points the entry's argument array at the input and the
globals, runs the graph once for the whole batch with the arena in the workspace, and copies the output
out of the arena. Nothing is allocated and there is no global mutable state, so calls with separate
workspaces may run concurrently. See docs/embedding.md.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
from llvmlite import ir as ll

from .codegen import lower_graph
from .jit import host_target, optimize, target_machine
from .layout import ALIGN

EMITS = ("so", "h", "obj", "llvm", "asm")

# error codes shared by the header and the generated code
OK, ERR_NULL_ARG, ERR_BAD_BATCH, ERR_WORKSPACE_TOO_SMALL = 0, 1, 2, 3
# batch * (any per-sample byte count) + fixed + slack must stay far from 2^64; 2^48 bytes (256 TiB) is
# beyond any real address space, and 2^31 - 1 images keeps the batch an int in every kernel loop.
MAX_TOTAL_BYTES = 1 << 48
MAX_BATCH_CAP = (1 << 31) - 1

I8, I32, I64 = ll.IntType(8), ll.IntType(32), ll.IntType(64)
PTR = ll.PointerType()
VOID = ll.VoidType()


class NativeExportError(RuntimeError):
    """The native library could not be produced (no C compiler, linker failure)."""


def c_identifier(name: str) -> str:
    """`name` made a valid C identifier: other characters become '_', a leading digit gets a '_'."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "model"
    return "_" + ident if ident[0].isdigit() else ident


def _atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    from graphcnn.artifact import atomic_write_bytes
    atomic_write_bytes(path, data)
    os.chmod(path, mode)        # the temp file was private (0600); artifacts are meant to be shared


# -- what the C API needs to know about the graph -------------------------------------------------
class ApiShape:
    """Sizes of the graph's single input and output, and the batch limit."""

    def __init__(self, g, layout):
        if len(g.inputs) != 1 or len(g.outputs) != 1:
            raise ValueError(f"native export: graph {g.name!r} must have exactly one input and one output "
                             f"(has {len(g.inputs)} inputs, {len(g.outputs)} outputs)")
        x, y = g.inputs[0], g.outputs[0]
        if not x.type.batched or not y.type.batched:
            raise ValueError(f"native export: input %{x.name} and output %{y.name} must both have a "
                             f"dynamic batch dimension (got {x.type} and {y.type})")
        if str(x.type.dtype) != "f32" or str(y.type.dtype) != "f32":
            raise ValueError(f"native export: input and output must be f32 (got {x.type}, {y.type})")
        self.input_name, self.output_name = x.name, y.name
        self.input_dims = tuple(int(d) for d in x.shape[1:])
        self.output_dims = tuple(int(d) for d in y.shape[1:])
        self.input_bytes = x.type.nbytes(1)          # per image
        self.output_bytes = y.type.nbytes(1)
        self.arena_per_sample = int(layout.arena_per_sample)
        self.arena_fixed = int(layout.arena_fixed)
        per_sample = max(self.arena_per_sample, self.input_bytes, self.output_bytes, 1)
        self.max_batch = int(min(MAX_BATCH_CAP, (MAX_TOTAL_BYTES - self.arena_fixed - ALIGN) // per_sample))
        if self.max_batch < 1:
            raise ValueError(f"native export: the arena of {g.name!r} is too large to address")

    def workspace_size(self, batch: int) -> int:
        """The exact value NAME_workspace_size(batch) returns."""
        if batch <= 0 or batch > self.max_batch:
            return 0
        return batch * self.arena_per_sample + self.arena_fixed + ALIGN


# -- LLVM IR for globals and the C API --------------------------------------------------------------
def _leaf_arrays(g, weights) -> dict:
    """leaf name -> the bytes compiled into the library (params from `weights`, constants from g)."""
    arrays = {}
    for v in g.params:
        if v.name not in weights:
            raise ValueError(f"native export: weights has no entry for param %{v.name}")
        a = np.ascontiguousarray(weights[v.name], dtype=v.type.np_dtype)
        if a.shape != tuple(v.shape):
            raise ValueError(f"native export: weight {v.name!r} has shape {a.shape}, graph expects {tuple(v.shape)}")
        arrays[v.name] = a
    for v in g.const_values:
        arrays[v.name] = np.ascontiguousarray(g.consts[v.name], dtype=v.type.np_dtype)
    return arrays


def _add_global(module, symbol: str, array: np.ndarray):
    """An internal constant byte-array global holding `array` (aligned to 64 for vector loads)."""
    data = bytearray(array.tobytes()) or bytearray(1)   # LLVM globals need at least one byte
    ty = ll.ArrayType(I8, len(data))
    gv = ll.GlobalVariable(module, ty, name=symbol)
    gv.linkage = "internal"
    gv.global_constant = True
    gv.unnamed_addr = True
    gv.align = ALIGN
    gv.initializer = ll.Constant(ty, data)
    return gv


def _i64(v):
    return ll.Constant(I64, int(v))


def _i32(v):
    return ll.Constant(I32, int(v))


def _define_workspace_size(module, name, shape):
    fn = ll.Function(module, ll.FunctionType(I64, [I64]), name=f"{name}_workspace_size")
    fn.attributes.add("nounwind")
    (batch,) = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    ok = b.and_(b.icmp_signed(">", batch, _i64(0)), b.icmp_signed("<=", batch, _i64(shape.max_batch)))
    size = b.add(b.mul(batch, _i64(shape.arena_per_sample)), _i64(shape.arena_fixed + ALIGN))
    b.ret(b.select(ok, size, _i64(0)))
    return fn


def _define_run(module, name, shape, entry, layout, globals_by_leaf):
    """internal i32 NAME_run(input, batch, output, workspace, workspace_bytes, check_size)."""
    fn = ll.Function(module, ll.FunctionType(I32, [PTR, I64, PTR, PTR, I64, ll.IntType(1)]), name=f"{name}_run")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    inp, batch, out, ws, ws_bytes, check = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    null = ll.Constant(PTR, None)

    def fail_if(cond, code, label):
        bad, good = fn.append_basic_block(f"{label}_bad"), fn.append_basic_block(f"{label}_ok")
        b.cbranch(cond, bad, good)
        b.position_at_end(bad)
        b.ret(_i32(code))
        b.position_at_end(good)

    any_null = b.or_(b.or_(b.icmp_unsigned("==", inp, null), b.icmp_unsigned("==", out, null)),
                     b.icmp_unsigned("==", ws, null))
    fail_if(any_null, ERR_NULL_ARG, "null")
    bad_batch = b.or_(b.icmp_signed("<=", batch, _i64(0)), b.icmp_signed(">", batch, _i64(shape.max_batch)))
    fail_if(bad_batch, ERR_BAD_BATCH, "batch")
    need = b.add(b.mul(batch, _i64(shape.arena_per_sample)), _i64(shape.arena_fixed + ALIGN))
    fail_if(b.and_(check, b.icmp_unsigned("<", ws_bytes, need)), ERR_WORKSPACE_TOO_SMALL, "workspace")

    # align the arena up to 64 bytes inside the caller's workspace (the +64 slack in the size pays for it)
    ws_int = b.ptrtoint(ws, I64)
    pad = b.and_(b.sub(_i64(0), ws_int), _i64(ALIGN - 1))
    arena = b.gep(ws, [pad], inbounds=True, source_etype=I8)

    n_args = max(1, len(layout.arg_order))
    args_ty = ll.ArrayType(PTR, n_args)
    args = b.alloca(args_ty, name="args")
    args.type = PTR     # llvmlite still types allocas; the rest of the backend uses opaque `ptr`
    leaf_ptr = {shape.input_name: inp}
    leaf_ptr.update(globals_by_leaf)
    for i, leaf in enumerate(layout.arg_order):
        slot = b.gep(args, [_i64(i)], inbounds=True, source_etype=PTR)
        b.store(leaf_ptr[leaf], slot)
    call_args = [args, batch, arena]
    if len(entry.args) == 4:            # (args, n, arena, first): one call covers the whole batch
        call_args.append(_i64(0))
    b.call(entry, call_args)

    s = layout.resolve(shape.output_name)
    if s.kind == "arena":
        src = b.gep(arena, [b.add(b.mul(batch, _i64(s.per_sample)), _i64(s.fixed))], inbounds=True, source_etype=I8)
    else:                               # the output is a leaf itself (e.g. an identity graph)
        src = leaf_ptr[layout.arg_order[s.index]]
    memcpy = module.globals.get("llvm.memcpy.p0.p0.i64") or ll.Function(
        module, ll.FunctionType(VOID, [PTR, PTR, I64, ll.IntType(1)]), name="llvm.memcpy.p0.p0.i64")
    b.call(memcpy, [out, src, b.mul(batch, _i64(shape.output_bytes)), ll.Constant(ll.IntType(1), 0)])
    b.ret(_i32(OK))
    return fn


def _define_predict(module, name, run, checked: bool):
    params = [PTR, I64, PTR, PTR] + ([I64] if checked else [])
    fn = ll.Function(module, ll.FunctionType(I32, params),
                     name=f"{name}_predict_checked" if checked else f"{name}_predict")
    fn.attributes.add("nounwind")
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    a = list(fn.args)
    ws_bytes = a[4] if checked else _i64(0)
    b.ret(b.call(run, a[:4] + [ws_bytes, ll.Constant(ll.IntType(1), int(checked))]))
    return fn


def build_module(g, weights, name=None):
    """-> (llvmlite module with the graph, its weights and the C API, C name, ApiShape)."""
    name = c_identifier(name or g.name)
    module, entry_name, layout = lower_graph(g, host_target(), entry_name=f"{name}_graph")
    entry = module.get_global(entry_name)
    entry.linkage = "internal"          # only the C API is exported; lets LLVM inline the graph
    shape = ApiShape(g, layout)
    globals_by_leaf = {leaf: _add_global(module, f"{name}_leaf{i}", arr)
                       for i, (leaf, arr) in enumerate(_leaf_arrays(g, weights).items())}
    _define_workspace_size(module, name, shape)
    run = _define_run(module, name, shape, entry, layout, globals_by_leaf)
    _define_predict(module, name, run, checked=False)
    _define_predict(module, name, run, checked=True)
    return module, name, shape


def uses_malloc(module) -> bool:
    """Whether a kernel in `module` allocates heap scratch (large matmul buffers do)."""
    return "malloc" in module.globals


# -- the header -----------------------------------------------------------------------------------
HEADER = """\
/* {name}.h - C API of the graphcnn model '{graph_name}' (generated by graphcnn; do not edit).
 *
 * Link with {name}.so (weights compiled in, no Python needed). Input: float32 images, NHWC,
 * {batch_doc}; output: {output_size} float32 values per image.
 * The library is compiled for the CPU it was built on ({cpu}).
 * A 64-bit (LP64) platform is assumed: size_t is 64 bits.
 */
#ifndef {guard}
#define {guard}

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

{dims}
#define {name}_INPUT_SIZE {input_size}  /* floats per input image */
#define {name}_OUTPUT_SIZE {output_size}  /* floats per output row (per image) */
#define {name}_ARENA_PER_IMAGE_BYTES {per_image}ULL
#define {name}_ARENA_FIXED_BYTES {fixed}ULL
#define {name}_WORKSPACE_ALIGN_SLACK {align}ULL  /* the workspace is aligned up to 64 bytes internally */
#define {name}_MAX_BATCH {max_batch}LL  /* larger batches are refused (sizes stay far from overflow) */

#define {name}_OK 0
#define {name}_ERR_NULL_ARG {e_null}  /* input, output or workspace is NULL */
#define {name}_ERR_BAD_BATCH {e_batch}  /* batch <= 0 or batch > {name}_MAX_BATCH */
#define {name}_ERR_WORKSPACE_TOO_SMALL {e_ws}  /* predict_checked: workspace_bytes < workspace_size(batch) */

/* Bytes of workspace predict() needs for `batch` images: exactly
 *   batch * {name}_ARENA_PER_IMAGE_BYTES + {name}_ARENA_FIXED_BYTES + 64.
 * Returns 0 when batch <= 0 or batch > {name}_MAX_BATCH. Any alignment of the workspace is fine. */
size_t {name}_workspace_size(int64_t batch);

/* Run the model on `batch` images.
 *   input:     batch * {name}_INPUT_SIZE floats (NHWC), read only
 *   output:    batch * {name}_OUTPUT_SIZE floats, written
 *   workspace: at least {name}_workspace_size(batch) bytes, used as scratch (not initialized)
 * Returns {name}_OK (0) or an error code ({name}_ERR_*). {alloc_doc} No global mutable state: calls
 * with separate workspaces may run concurrently from several threads. */
int {name}_predict(const float *input, int64_t batch, float *output, void *workspace);

/* predict() that also checks the workspace size: returns {name}_ERR_WORKSPACE_TOO_SMALL when
 * workspace_bytes < {name}_workspace_size(batch). */
int {name}_predict_checked(const float *input, int64_t batch, float *output, void *workspace,
                           size_t workspace_bytes);

#ifdef __cplusplus
}}
#endif

#endif /* {guard} */
"""


def render_header(name, graph_name, shape, kernel_mallocs=False) -> str:
    """The text of NAME.h for a model with C name `name`; `kernel_mallocs`: some kernel allocates scratch."""
    dims = shape.input_dims
    if len(dims) == 3:
        dim_lines = "\n".join(f"#define {name}_INPUT_{k} {d}" for k, d in zip("HWC", dims))
        batch_doc = f"shape (batch, {dims[0]}, {dims[1]}, {dims[2]})"
    else:
        dim_lines = f"/* input per image: {dims} */"
        batch_doc = f"shape (batch, {', '.join(map(str, dims))})"
    return HEADER.format(
        name=name, graph_name=graph_name, guard=f"GRAPHCNN_{name.upper()}_H", dims=dim_lines,
        input_size=int(np.prod(dims, dtype=np.int64)), output_size=int(np.prod(shape.output_dims, dtype=np.int64)),
        per_image=shape.arena_per_sample, fixed=shape.arena_fixed, align=ALIGN, max_batch=shape.max_batch,
        e_null=ERR_NULL_ARG, e_batch=ERR_BAD_BATCH, e_ws=ERR_WORKSPACE_TOO_SMALL, batch_doc=batch_doc,
        cpu=host_target().cpu,
        alloc_doc="Some kernels malloc/free scratch buffers too large for the stack." if kernel_mallocs
        else "Nothing is allocated.")


# -- linking --------------------------------------------------------------------------------------
def find_c_compiler() -> str:
    """Path of the C compiler used as linker: $CC, else cc, gcc or clang on PATH."""
    for cand in [os.environ.get("CC")] + ["cc", "gcc", "clang"]:
        if cand:
            path = shutil.which(cand)
            if path:
                return path
    raise NativeExportError("--emit so needs a C compiler to link the shared library: none of $CC, cc, gcc, "
                            "clang was found on PATH (install one, or emit obj and link it yourself)")


def link_shared(obj_bytes: bytes, so_path: str, soname: str) -> None:
    """`cc -shared -o so_path obj -lm`, written atomically."""
    cc = find_c_compiler()
    folder = os.path.dirname(os.path.abspath(so_path))
    with tempfile.TemporaryDirectory(prefix=".gcnn-link-", dir=folder) as tmp:
        obj = os.path.join(tmp, "model.o")
        with open(obj, "wb") as f:
            f.write(obj_bytes)
        out = os.path.join(tmp, "model.so")
        cmd = [cc, "-shared", "-o", out, obj, f"-Wl,-soname,{soname}", "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise NativeExportError(f"linking {so_path} failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
        os.chmod(out, 0o755)
        os.replace(out, so_path)


def write_native(g, weights, folder, emit):
    """Write the artifacts named in `emit` (so, h, obj, llvm, asm) for inference graph `g` into `folder`.

    g must be an optimized inference graph with one batched f32 input and one batched f32 output;
    weights maps every param name to its array. Returns the list of written paths."""
    emit = list(emit)
    bad = [e for e in emit if e not in EMITS]
    if bad:
        raise ValueError(f"write_native: unknown emit kind(s) {bad} (choose from {', '.join(EMITS)})")
    if not emit:
        raise ValueError("write_native: emit is empty; nothing to write")
    os.makedirs(folder, exist_ok=True)
    module, name, shape = build_module(g, weights)
    written = []

    def path(ext):
        return os.path.join(folder, f"{name}.{ext}")

    if any(e in emit for e in ("so", "obj", "llvm", "asm")):
        tm = target_machine(3, reloc="pic", jit=False)
        opt_mod = optimize(str(module), 3, tm)
        if "llvm" in emit:
            _atomic_write(path("ll"), str(opt_mod).encode())
            written.append(path("ll"))
        if "asm" in emit:
            _atomic_write(path("s"), tm.emit_assembly(opt_mod).encode())
            written.append(path("s"))
        if "obj" in emit or "so" in emit:
            obj = tm.emit_object(opt_mod)
            if "obj" in emit:
                _atomic_write(path("o"), obj)
                written.append(path("o"))
            if "so" in emit:
                link_shared(obj, path("so"), f"{name}.so")
                written.append(path("so"))
    if "h" in emit:
        _atomic_write(path("h"), render_header(name, g.name, shape, uses_malloc(module)).encode())
        written.append(path("h"))
    return written
