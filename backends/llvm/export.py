"""Native export: an optimized inference graph -> NAME.so / NAME.h (+ NAME.o, NAME.ll, NAME.s).

The shared library needs no Python: weights and constants are compiled in as read-only globals, and a
small C API wraps the graph's entry function (backends/llvm/codegen.py):

    size_t NAME_workspace_size(int64_t batch);          exact bytes, 0 if batch is out of range
    int    NAME_predict(const float *input, int64_t batch, float *output, void *workspace);
    int    NAME_predict_checked(const float *input, int64_t batch, float *output,
                                void *workspace, size_t workspace_bytes);

    size_t NAME_workspace_size_threads(int64_t batch, int threads);     0 if out of range
    int    NAME_predict_threads(const float *input, int64_t batch, float *output, void *workspace,
                                int threads);
    int    NAME_predict_threads_checked(..., void *workspace, size_t workspace_bytes, int threads);

`predict` aligns the workspace up to 64 bytes, points the entry's argument array at the input and the
globals, runs the graph once for the whole batch with the arena in the workspace, and copies the output
out of the arena. Nothing is allocated and there is no global mutable state, so calls with separate
workspaces may run concurrently. See docs/embedding.md.

`predict_threads` uses the library's own pthread pool (thread_pool.define_pool with own_lifecycle and
claim_lines: the internal NAME_pool_* symbols, workers created on first use, joined by a destructor, work
claimed through atomic counters): a per-sample graph cuts a batch >= 2 into chunks of
min(CHUNK_IMAGES, ceil(batch / threads)) images, claimed by the workers and run through the same graph entry
in the claiming worker's own arena (NAME_chunk, NAME_chunks); batch 1 runs the claim team entry (codegen:
conv row-tile pieces claimed by the workers). The pool is taken with a try-lock; a busy pool means this
call runs its chunks (or the whole batch) alone.

No user text reaches the C or LLVM output unquoted: NAME is ir.types.ascii_identifier(graph name) (an
ASCII identifier; a name it had to change carries a digest, so distinct names stay distinct), symbol
clashes inside the module are refused, and the graph's own name appears only in a header comment made
safe by c_comment_text.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import textwrap

import numpy as np
from llvmlite import ir as ll
from llvmlite.ir._utils import DuplicatedNameError

from ir.types import ascii_identifier

from ir.passes.batch_coupling import coupling_nodes

from . import thread_pool
from .codegen import lower_graph
from .jit import JitModule, host_target, optimize, target_machine
from .layout import ALIGN

EMITS = ("so", "h", "obj", "llvm", "asm")
# Stack bound stated in NAME.h: kernels allocate nothing on the stack beyond register spills (scratch is
# carved from the workspace), so a call's frames (predict -> run -> graph -> one kernel) stay far below
# this; tests/test_llvm_backend.py measures the frames of generated code against it.
STACK_BOUND_BYTES = 16384

# error codes shared by the header and the generated code
OK, ERR_NULL_ARG, ERR_BAD_BATCH, ERR_WORKSPACE_TOO_SMALL, ERR_BAD_THREADS = 0, 1, 2, 3, 4
# predict_threads: 1 .. MAX_THREADS threads (the pool's own cap); a chunked call cuts the batch into chunks of
# at most CHUNK_IMAGES images (thread_pool.py says why that size)
MAX_THREADS = thread_pool.MAX_THREADS
CHUNK_IMAGES = thread_pool.CHUNK_IMAGES
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
    """The C name (symbol prefix, file stem, macro prefix) of a model: ir.types.ascii_identifier."""
    return ascii_identifier(name) if name else "model"


def c_comment_text(text: str) -> str:
    """`text` for the inside of a /* */ comment: printable ASCII (backslash escapes for the rest, so no
    line break), with '*/' and '/*' broken apart so the comment can neither end nor nest."""
    safe = ascii(str(text))[1:-1]
    return re.sub(r"/(?=\*)|\*(?=/)", lambda m: m.group() + " ", safe)


def _atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    from graphcnn.artifact import atomic_write_bytes
    atomic_write_bytes(path, data)
    os.chmod(path, mode)        # the temp file was private (0600); artifacts are meant to be shared


# -- what the C API needs to know about the graph -------------------------------------------------
class ApiShape:
    """Sizes of the graph's single input and output, and the batch limit."""

    def __init__(self, g, layout, threads_mode=(False, False)):
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
        # the kernels' scratch region after the planned values (its alignment padding included)
        self.scratch_per_sample = int(layout.arena_bytes(1) - layout.arena_bytes(0)) - self.arena_per_sample
        self.scratch_fixed = int(layout.arena_bytes(0)) - self.arena_fixed
        self.total_per_sample = self.arena_per_sample + self.scratch_per_sample
        self.total_fixed = self.arena_fixed + self.scratch_fixed
        per_sample = max(self.total_per_sample, self.input_bytes, self.output_bytes, 1)
        self.max_batch = int(min(MAX_BATCH_CAP, (MAX_TOTAL_BYTES - self.total_fixed - ALIGN) // per_sample))
        if self.max_batch < 1:
            raise ValueError(f"native export: the arena of {g.name!r} is too large to address")
        # predict_threads: `splittable` (per-sample graph, a pool on this platform): a batch >= 2 runs as
        # chunks, one per worker, each in its own arena; `team` (the graph has a team entry): a batch the
        # chunks cannot split (1, or any batch of a graph coupling its samples) splits inside the kernels
        self.splittable, self.team = threads_mode
        self.team_offset = layout.scratch_offset()          # (per-sample, fixed) of worker 0's scratch
        self.team_scratch = (int(layout.scratch_per_sample), int(layout.scratch_fixed))

    def workspace_size(self, batch: int) -> int:
        """The exact value NAME_workspace_size(batch) returns."""
        if batch <= 0 or batch > self.max_batch:
            return 0
        return batch * self.total_per_sample + self.total_fixed + ALIGN

    def chunk_images(self, batch: int, threads: int) -> int:
        """Images per chunk of a chunked call (thread_pool.chunk_images)."""
        return thread_pool.chunk_images(batch, threads)

    def chunk_arena_stride(self, images: int) -> int:
        """Bytes of one worker's arena in a chunked call (the arena of `images` images, plus up to 63
        bytes that align it to 64)."""
        return images * self.total_per_sample + self.total_fixed + ALIGN

    def workspace_size_threads(self, batch: int, threads: int) -> int:
        """The exact value NAME_workspace_size_threads(batch, threads) returns; it never decreases as batch
        grows. threads == 1: workspace_size(batch). Otherwise the max of: for batch >= 2 of a splittable
        graph, one chunk arena per thread, threads * chunk_arena_stride(chunk_images(batch, threads)) + 64
        (else workspace_size(batch)); and, with a team entry, the team call's arena with one scratch region
        per thread (thread_pool.team_arena_bytes) + 64, for batch 1 (splittable) or `batch` (a coupling
        graph)."""
        if batch <= 0 or batch > self.max_batch or threads < 1 or threads > MAX_THREADS:
            return 0
        if threads == 1:
            return self.workspace_size(batch)
        if self.splittable and batch >= 2:
            size = threads * self.chunk_arena_stride(self.chunk_images(batch, threads)) + ALIGN
        else:
            size = self.workspace_size(batch)
        if self.team:
            size = max(size, self.team_size(1 if self.splittable else batch, threads))
        return size

    def team_size(self, n: int, threads: int) -> int:
        ps, fx = self.team_offset
        sps, sfx = self.team_scratch
        stride = -(-(n * sps + sfx) // ALIGN) * ALIGN
        return n * ps + fx + threads * stride + ALIGN


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


def _packed_leaves(module, layout, leaves) -> dict:
    """packed leaf name -> its bytes (layout.packed: lower_graph(prepack=True)), made by JIT-running the
    module's own pack_only kernels on the weights; those kernels then become internal (the library never
    calls them, so they are dropped from it)."""
    if not layout.packed:
        return {}
    jit = JitModule(str(module))
    out = {name: info.pack(jit.address(info.kernel), [leaves[s] for s in info.sources])
           for name, info in layout.packed.items()}
    for info in layout.packed.values():
        module.get_global(info.kernel).linkage = "internal"
    return out


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
    size = b.add(b.mul(batch, _i64(shape.total_per_sample)), _i64(shape.total_fixed + ALIGN))
    b.ret(b.select(ok, size, _i64(0)))
    return fn


class LeafTable:
    """Leaves the caller supplies at run time instead of globals holding the weights (the JIT runtime,
    whose params stay Python arrays): a global array of pointers, in `order`, which the caller fills
    through its address (`symbol`) before a call; every C API function loads them on entry."""

    def __init__(self, module, symbol, order):
        self.order, self.symbol = list(order), symbol
        ty = ll.ArrayType(PTR, max(1, len(self.order)))
        self.table = ll.GlobalVariable(module, ty, name=symbol)
        self.table.initializer = ll.Constant(ty, None)

    def pointers(self, b) -> dict:
        return {leaf: b.load(b.gep(self.table, [_i64(i)], inbounds=True, source_etype=PTR), typ=PTR)
                for i, leaf in enumerate(self.order)}


class PoolPointer:
    """A pool `run` function reached through a pointer global (`symbol`) the caller sets: the JIT
    runtime's process-wide claim pool (thread_pool.process_claim_pool), whose workers outlive any module."""

    def __init__(self, module, symbol):
        self.symbol = symbol
        self.gv = ll.GlobalVariable(module, PTR, name=symbol)
        self.gv.initializer = ll.Constant(PTR, None)


def _leaf_pointers(b, leaves) -> dict:
    """leaf name -> its pointer in the function being built: the weight globals, or a LeafTable's loads."""
    return leaves.pointers(b) if isinstance(leaves, LeafTable) else leaves


def _call_pool(b, pool_run, args):
    if isinstance(pool_run, PoolPointer):
        fnp = b.load(pool_run.gv, typ=PTR)
        return b.call(thread_pool.indirect_callee(b.inttoptr(b.ptrtoint(fnp, I64), PTR), thread_pool.RUN_TYPE), args)
    return b.call(pool_run, args)


def _store_leaves(b, layout, args, leaf_ptr):
    for i, leaf in enumerate(layout.arg_order):
        b.store(leaf_ptr[leaf], b.gep(args, [_i64(i)], inbounds=True, source_etype=PTR))


def _alloca_args(b, layout):
    args = b.alloca(ll.ArrayType(PTR, max(1, len(layout.arg_order))), name="args")
    args.type = PTR     # llvmlite still types allocas; the rest of the backend uses opaque `ptr`
    return args


def _copy_output(module, b, shape, layout, arena, n, out, leaf_ptr):
    """Copy n output rows from the arena (or the leaf the output is) to `out`."""
    s = layout.resolve(shape.output_name)
    if s.kind == "arena":
        src = b.gep(arena, [b.add(b.mul(n, _i64(s.per_sample)), _i64(s.fixed))], inbounds=True, source_etype=I8)
    else:                               # the output is a leaf itself (e.g. an identity graph)
        src = leaf_ptr[layout.arg_order[s.index]]
    memcpy = module.globals.get("llvm.memcpy.p0.p0.i64") or ll.Function(
        module, ll.FunctionType(VOID, [PTR, PTR, I64, ll.IntType(1)]), name="llvm.memcpy.p0.p0.i64")
    b.call(memcpy, [out, src, b.mul(n, _i64(shape.output_bytes)), ll.Constant(ll.IntType(1), 0)])


def _call_entry(b, entry, args, n, arena, first):
    call_args = [args, n, arena]
    if len(entry.args) == 4:            # (args, n, arena, first)
        call_args.append(first)
    b.call(entry, call_args)


class _Checks:
    """The argument checks every C API call starts with (in the documented order), returning the code."""

    def __init__(self, fn, b):
        self.fn, self.b = fn, b

    def fail_if(self, cond, code, label):
        bad, good = self.fn.append_basic_block(f"{label}_bad"), self.fn.append_basic_block(f"{label}_ok")
        self.b.cbranch(cond, bad, good)
        self.b.position_at_end(bad)
        self.b.ret(_i32(code))
        self.b.position_at_end(good)

    def pointers_and_batch(self, shape, inp, batch, out, ws):
        b, null = self.b, ll.Constant(PTR, None)
        any_null = b.or_(b.or_(b.icmp_unsigned("==", inp, null), b.icmp_unsigned("==", out, null)),
                         b.icmp_unsigned("==", ws, null))
        self.fail_if(any_null, ERR_NULL_ARG, "null")
        bad_batch = b.or_(b.icmp_signed("<=", batch, _i64(0)), b.icmp_signed(">", batch, _i64(shape.max_batch)))
        self.fail_if(bad_batch, ERR_BAD_BATCH, "batch")


def _aligned_arena(b, ws):
    """The workspace aligned up to 64 bytes (the +64 slack in every size pays for it)."""
    pad = b.and_(b.sub(_i64(0), b.ptrtoint(ws, I64)), _i64(ALIGN - 1))
    return b.gep(ws, [pad], inbounds=True, source_etype=I8)


def _define_run(module, name, shape, entry, layout, leaves):
    """internal i32 NAME_run(input, batch, output, workspace, workspace_bytes, check_size)."""
    fn = ll.Function(module, ll.FunctionType(I32, [PTR, I64, PTR, PTR, I64, ll.IntType(1)]), name=f"{name}_run")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    inp, batch, out, ws, ws_bytes, check = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    args = _alloca_args(b, layout)
    checks = _Checks(fn, b)
    checks.pointers_and_batch(shape, inp, batch, out, ws)
    need = b.add(b.mul(batch, _i64(shape.total_per_sample)), _i64(shape.total_fixed + ALIGN))
    checks.fail_if(b.and_(check, b.icmp_unsigned("<", ws_bytes, need)), ERR_WORKSPACE_TOO_SMALL, "workspace")
    arena = _aligned_arena(b, ws)
    leaf_ptr = {shape.input_name: inp, **_leaf_pointers(b, leaves)}
    _store_leaves(b, layout, args, leaf_ptr)
    _call_entry(b, entry, args, batch, arena, _i64(0))
    _copy_output(module, b, shape, layout, arena, batch, out, leaf_ptr)
    b.ret(_i32(OK))
    return fn


# the job a chunked call publishes (the pool's ARGS field points at it): i64 slots
JOB_INPUT, JOB_OUTPUT, JOB_ARENA, JOB_BATCH, JOB_CHUNK, JOB_CHUNKS, JOB_STRIDE, JOB_SLOTS = range(8)


def _umin(b, x, y):
    return b.select(b.icmp_unsigned("<", x, y), x, y)


def _umax(b, x, y):
    return b.select(b.icmp_unsigned(">", x, y), x, y)


def _job_field(b, job, k, typ=I64):
    v = b.load(b.gep(job, [_i64(k)], inbounds=True, source_etype=I64), typ=I64)
    return b.inttoptr(v, PTR) if typ is PTR else v


def _define_chunk(module, name, shape, entry, layout, leaves):
    """internal void NAME_chunk(ptr job, i64 c, i64 slot): chunk c of the job (images
    [c * CHUNK, min((c + 1) * CHUNK, batch))) through the single-threaded entry, in arena `slot` of the job's
    workspace (slot * STRIDE aligned up to 64), then its output rows copied out."""
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR, I64, I64]), name=f"{name}_chunk")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    job, c, slot = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    args = _alloca_args(b, layout)
    inp, out, base = _job_field(b, job, JOB_INPUT, PTR), _job_field(b, job, JOB_OUTPUT, PTR), _job_field(b, job, JOB_ARENA, PTR)
    batch, size, stride = _job_field(b, job, JOB_BATCH), _job_field(b, job, JOB_CHUNK), _job_field(b, job, JOB_STRIDE)
    lo = b.mul(c, size)
    n = b.sub(_umin(b, b.add(lo, size), batch), lo)
    off = b.and_(b.add(b.mul(slot, stride), _i64(ALIGN - 1)), _i64(-ALIGN))
    arena = b.gep(base, [off], inbounds=True, source_etype=I8)
    my_in = b.gep(inp, [b.mul(lo, _i64(shape.input_bytes))], inbounds=True, source_etype=I8)
    my_out = b.gep(out, [b.mul(lo, _i64(shape.output_bytes))], inbounds=True, source_etype=I8)
    leaf_ptr = {shape.input_name: my_in, **_leaf_pointers(b, leaves)}
    _store_leaves(b, layout, args, leaf_ptr)
    _call_entry(b, entry, args, n, arena, lo)
    _copy_output(module, b, shape, layout, arena, n, my_out, leaf_ptr)
    b.ret_void()
    return fn


def _define_chunk_team(module, name, chunk):
    """internal void NAME_chunks(ptr team, i64 worker): the workers claim chunks of the job's CHUNKS
    (thread_pool.claim_loop on line 0) and run each in their own arena (slot = worker); worker 0 returns
    when every chunk is done. A worker that is not scheduled leaves its chunks to the others, so the
    caller never waits for it."""
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR, I64]), name=f"{name}_chunks")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    team, worker = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    job = thread_pool.team_field(b, team, thread_pool.ARGS, PTR)
    chunks = _job_field(b, job, JOB_CHUNKS)
    thread_pool.claim_loop(b, fn, module, team, 0, chunks, lambda c: b.call(chunk, [job, c, worker]), "chunk")
    with b.if_then(b.icmp_unsigned("==", worker, _i64(0))):
        thread_pool.wait_done(b, fn, module, team, 0, chunks, "chunks")
    b.ret_void()
    return fn


def _define_run_threads(module, name, shape, entry, layout, leaves, pool_run, team_entry):
    """internal i32 NAME_run_threads(input, batch, output, workspace, workspace_bytes, check_size, threads):
    the checks (null, batch, threads, workspace), then one of: threads == 1 or no pool: the single-threaded
    call; a splittable graph and batch >= 2: chunks of ApiShape.chunk_images on the pool; batch 1 (or a graph
    coupling its samples) with a team entry: the team call (kernels split across `threads` workers).
    A busy pool (another caller holds it: try-lock) or a pool without workers means this thread runs the
    chunks one after the other in arena 0 (chunked) or the single-threaded call (team)."""
    fn = ll.Function(module, ll.FunctionType(I32, [PTR, I64, PTR, PTR, I64, ll.IntType(1), I32]),
                     name=f"{name}_run_threads")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    inp, batch, out, ws, ws_bytes, check, threads32 = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    args = _alloca_args(b, layout)
    job = b.alloca(ll.ArrayType(I64, JOB_SLOTS), name="job")
    job.type = PTR
    checks = _Checks(fn, b)
    checks.pointers_and_batch(shape, inp, batch, out, ws)
    bad_threads = b.or_(b.icmp_signed("<", threads32, _i32(1)), b.icmp_signed(">", threads32, _i32(MAX_THREADS)))
    checks.fail_if(bad_threads, ERR_BAD_THREADS, "threads")
    threads = b.sext(threads32, I64)
    need = _workspace_threads_ir(b, shape, batch, threads)
    checks.fail_if(b.and_(check, b.icmp_unsigned("<", ws_bytes, need)), ERR_WORKSPACE_TOO_SMALL, "workspace")
    arena = _aligned_arena(b, ws)
    leaf_ptr = {shape.input_name: inp, **_leaf_pointers(b, leaves)}
    _store_leaves(b, layout, args, leaf_ptr)
    single = fn.append_basic_block("single")
    multi = b.icmp_signed(">", threads, _i64(1))
    if shape.splittable:
        chunked, not_chunked = fn.append_basic_block("chunked"), fn.append_basic_block("not_chunked")
        b.cbranch(b.and_(multi, b.icmp_signed(">=", batch, _i64(2))), chunked, not_chunked)
        b.position_at_end(chunked)
        size = _chunk_images_ir(b, batch, threads)
        chunks = b.udiv(b.add(batch, b.sub(size, _i64(1))), size)
        stride = b.add(b.mul(size, _i64(shape.total_per_sample)), _i64(shape.total_fixed + ALIGN))
        for k, v in ((JOB_INPUT, b.ptrtoint(inp, I64)), (JOB_OUTPUT, b.ptrtoint(out, I64)),
                     (JOB_ARENA, b.ptrtoint(arena, I64)), (JOB_BATCH, batch), (JOB_CHUNK, size),
                     (JOB_CHUNKS, chunks), (JOB_STRIDE, stride)):
            b.store(v, b.gep(job, [_i64(k)], inbounds=True, source_etype=I64))
        chunk = _define_chunk(module, name, shape, entry, layout, leaves)
        chunk_team = _define_chunk_team(module, name, chunk)
        ran = _call_pool(b, pool_run, [chunk_team, job, batch, arena, _i64(0), _umin(b, chunks, threads)])
        done, alone = fn.append_basic_block("chunked_done"), fn.append_basic_block("chunked_alone")
        b.cbranch(b.icmp_unsigned("!=", ran, _i32(0)), done, alone)
        b.position_at_end(done)
        b.ret(_i32(OK))
        # the pool is busy (or has no worker): every chunk on this thread, in arena 0 (the workspace may be
        # smaller than workspace_size(batch))
        b.position_at_end(alone)
        thread_pool.count_loop(b, fn, _i64(0), chunks, lambda c: b.call(chunk, [job, c, _i64(0)]), "alone")
        b.branch(done)
        b.position_at_end(not_chunked)
    if team_entry is not None:
        teamed, team_done = fn.append_basic_block("team"), fn.append_basic_block("team_done")
        b.cbranch(multi, teamed, single)
        b.position_at_end(teamed)
        ran = _call_pool(b, pool_run, [team_entry, args, batch, arena, _i64(0), threads])
        b.cbranch(b.icmp_unsigned("!=", ran, _i32(0)), team_done, single)
        b.position_at_end(team_done)
        _copy_output(module, b, shape, layout, arena, batch, out, leaf_ptr)
        b.ret(_i32(OK))
    else:
        b.branch(single)
    b.position_at_end(single)
    _call_entry(b, entry, args, batch, arena, _i64(0))
    _copy_output(module, b, shape, layout, arena, batch, out, leaf_ptr)
    b.ret(_i32(OK))
    return fn


def _chunk_images_ir(b, batch, threads):
    """ApiShape.chunk_images: min(CHUNK_IMAGES, ceil(batch / threads)) (i64 values, both >= 1)."""
    return _umin(b, b.udiv(b.add(batch, b.sub(threads, _i64(1))), threads), _i64(CHUNK_IMAGES))


def _workspace_threads_ir(b, shape, batch, threads):
    """ApiShape.workspace_size_threads for a checked batch and thread count (i64 values)."""
    size = b.add(b.mul(batch, _i64(shape.total_per_sample)), _i64(shape.total_fixed + ALIGN))
    multi = b.icmp_signed(">", threads, _i64(1))
    if shape.splittable:
        stride = b.add(b.mul(_chunk_images_ir(b, batch, threads), _i64(shape.total_per_sample)),
                       _i64(shape.total_fixed + ALIGN))
        chunked = b.add(b.mul(threads, stride), _i64(ALIGN))
        size = b.select(b.and_(multi, b.icmp_signed(">=", batch, _i64(2))), chunked, size)
    if shape.team:
        (ps, fx), (sps, sfx) = shape.team_offset, shape.team_scratch
        n = _i64(1) if shape.splittable else batch
        stride = b.and_(b.add(b.mul(n, _i64(sps)), _i64(sfx + ALIGN - 1)), _i64(-ALIGN))
        team = b.add(b.add(b.mul(n, _i64(ps)), _i64(fx + ALIGN)), b.mul(threads, stride))
        size = b.select(multi, _umax(b, size, team), size)
    return size


def _define_workspace_size_threads(module, name, shape):
    fn = ll.Function(module, ll.FunctionType(I64, [I64, I32]), name=f"{name}_workspace_size_threads")
    fn.attributes.add("nounwind")
    batch, threads32 = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    ok = b.and_(b.icmp_signed(">", batch, _i64(0)), b.icmp_signed("<=", batch, _i64(shape.max_batch)))
    ok = b.and_(ok, b.and_(b.icmp_signed(">=", threads32, _i32(1)), b.icmp_signed("<=", threads32, _i32(MAX_THREADS))))
    # out-of-range arguments are replaced by 1 before the size rule (it divides by threads), then discarded
    safe_batch, safe_threads = b.select(ok, batch, _i64(1)), b.select(ok, b.sext(threads32, I64), _i64(1))
    b.ret(b.select(ok, _workspace_threads_ir(b, shape, safe_batch, safe_threads), _i64(0)))
    return fn


def _define_predict(module, name, run, checked: bool, threads: bool = False):
    """NAME_predict[_threads][_checked](input, batch, output, workspace[, workspace_bytes][, threads]) -> i32:
    `run` (NAME_run or NAME_run_threads) with the size check on when `checked`."""
    params = [PTR, I64, PTR, PTR] + ([I64] if checked else []) + ([I32] if threads else [])
    fn = ll.Function(module, ll.FunctionType(I32, params),
                     name=f"{name}_predict" + ("_threads" if threads else "") + ("_checked" if checked else ""))
    fn.attributes.add("nounwind")
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    a = list(fn.args)
    ws_bytes = a[4] if checked else _i64(0)
    b.ret(b.call(run, a[:4] + [ws_bytes, ll.Constant(ll.IntType(1), int(checked))] + (a[-1:] if threads else [])))
    return fn


def build_module(g, weights, name=None, target=None):
    """-> (llvmlite module with the graph, its weights and the C API, C name, ApiShape); kernels are
    generated for `target` (a jit.HostTarget, default: the host)."""
    name = c_identifier(name or g.name)
    pool = thread_pool.available()      # Linux x86-64: the library owns a pthread pool (thread_pool.py)
    target = target or host_target()
    # GEMM weights are packed here, once, when the kernels can run on this machine (the target is the
    # host): the library then holds them packed, as gc.load's runtime does (frozen_params)
    prepack = target == host_target() and not g.updates
    try:
        module, entry_name, layout = lower_graph(g, target, entry_name=f"{name}_graph",
                                                 team="claim" if pool else False, prepack=prepack)
        entry = module.get_global(entry_name)
        entry.linkage = "internal"          # only the C API is exported; lets LLVM inline the graph
        team_entry = None
        if layout.team_entry_name:
            team_entry = module.get_global(layout.team_entry_name)
            team_entry.linkage = "internal"
        shape = ApiShape(g, layout, (pool and not coupling_nodes(g), team_entry is not None))
        leaves = _leaf_arrays(g, weights)
        packed = _packed_leaves(module, layout, leaves)
        globals_by_leaf = {leaf: _add_global(module, f"{name}_leaf{i}", arr)
                           for i, (leaf, arr) in enumerate(leaves.items())}
        globals_by_leaf.update({leaf: _add_global(module, f"{name}_packed{i}", arr)
                                for i, (leaf, arr) in enumerate(packed.items())})
        _define_workspace_size(module, name, shape)
        run = _define_run(module, name, shape, entry, layout, globals_by_leaf)
        _define_predict(module, name, run, checked=False)
        _define_predict(module, name, run, checked=True)
        pool_run = None
        if pool and (shape.splittable or shape.team):
            pool_run = thread_pool.define_pool(module, prefix=f"{name}_pool", own_lifecycle=True,
                                               claim_lines=max(1, layout.team_lines))
            pool_run.linkage = "internal"
        else:
            shape.splittable = shape.team = False
            team_entry = None
        _define_workspace_size_threads(module, name, shape)
        run_threads = _define_run_threads(module, name, shape, entry, layout, globals_by_leaf, pool_run, team_entry)
        _define_predict(module, name, run_threads, checked=False, threads=True)
        _define_predict(module, name, run_threads, checked=True, threads=True)
    except DuplicatedNameError as e:    # e.g. a model named like a kernel symbol: never merge two symbols
        raise NativeExportError(f"native export of {g.name!r}: symbol {e} is defined twice; rename the "
                                f"model") from None
    return module, name, shape


def add_runtime_api(module, g, layout, entry_name, name="gcapi", pooled=True):
    """The C API's threaded call for the JIT runtime (backends/llvm/executable.py): to a module lowered
    from inference graph g (lower_graph; team="claim" for a batch-1 team), add the external
    `NAME_run_threads(input, batch, output, workspace, workspace_bytes, check_size, threads) -> i32`,
    its leaves read from a LeafTable and its pool the process claim pool behind a PoolPointer, so a
    Python call is one native call that splits the batch (or one image's kernels) as the .so does.
    -> (ApiShape, LeafTable, PoolPointer or None, the function's symbol). ValueError when g has no C API
    shape (one batched f32 input and output)."""
    team_entry = None
    if layout.team_entry_name and layout.team_lines <= thread_pool.PROCESS_CLAIM_LINES:
        team_entry = module.get_global(layout.team_entry_name)
    pool = pooled and thread_pool.available()      # pooled=False: a one-thread runtime needs no pool
    shape = ApiShape(g, layout, (pool and not coupling_nodes(g), team_entry is not None))
    leaves = LeafTable(module, f"{name}_leaf_table", [leaf for leaf in layout.arg_order if leaf != shape.input_name])
    pool_run = PoolPointer(module, f"{name}_pool_run") if pool and (shape.splittable or shape.team) else None
    if pool_run is None:
        shape.splittable = shape.team = False
        team_entry = None
    fn = _define_run_threads(module, name, shape, module.get_global(entry_name), layout, leaves, pool_run,
                             team_entry)
    fn.linkage = "external"
    return shape, leaves, pool_run, fn.name


# -- the header -----------------------------------------------------------------------------------
HEADER = """\
/* {name}.h - C API of the graphcnn model "{graph_name}" (generated by graphcnn; do not edit).
 *
 * Link with {name}.so (weights compiled in, no Python needed). Input: float32 images, NHWC,
 * {batch_doc}; output: {output_size} float32 values per image.
 * Target CPU: {cpu_comment} ({vector_bits}-bit vectors); the library runs on CPUs with all of that
 * target's features ({name}_TARGET_CPU / {name}_TARGET_FEATURES below).{features_comment}
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
#define {name}_TARGET_CPU {cpu_literal}
#define {name}_TARGET_FEATURES {features_literal}
#define {name}_INPUT_SIZE {input_size}  /* floats per input image */
#define {name}_OUTPUT_SIZE {output_size}  /* floats per output row (per image) */
#define {name}_ARENA_PER_IMAGE_BYTES {per_image}ULL
#define {name}_ARENA_FIXED_BYTES {fixed}ULL
#define {name}_SCRATCH_PER_IMAGE_BYTES {scratch_per_image}ULL  /* kernel scratch (packed weights, padding) */
#define {name}_SCRATCH_FIXED_BYTES {scratch_fixed}ULL
#define {name}_WORKSPACE_ALIGN_SLACK {align}ULL  /* the workspace is aligned up to 64 bytes internally */
#define {name}_MAX_BATCH {max_batch}LL  /* larger batches are refused (sizes stay far from overflow) */
{quant_macros}
#define {name}_OK 0
#define {name}_ERR_NULL_ARG {e_null}  /* input, output or workspace is NULL */
#define {name}_ERR_BAD_BATCH {e_batch}  /* batch <= 0 or batch > {name}_MAX_BATCH */
#define {name}_ERR_WORKSPACE_TOO_SMALL {e_ws}  /* _checked: workspace_bytes < workspace_size(batch) (or _threads) */
#define {name}_ERR_BAD_THREADS {e_threads}  /* predict_threads: threads < 1 or threads > {name}_MAX_THREADS */
#define {name}_MAX_THREADS {max_threads}

/* Bytes of workspace predict() needs for `batch` images: exactly
 *   batch * ({name}_ARENA_PER_IMAGE_BYTES + {name}_SCRATCH_PER_IMAGE_BYTES)
 *   + {name}_ARENA_FIXED_BYTES + {name}_SCRATCH_FIXED_BYTES + 64.
 * Returns 0 when batch <= 0 or batch > {name}_MAX_BATCH. Any alignment of the workspace is fine. */
size_t {name}_workspace_size(int64_t batch);

/* Run the model on `batch` images.
 *   input:     batch * {name}_INPUT_SIZE floats (NHWC), read only
 *   output:    batch * {name}_OUTPUT_SIZE floats, written
 *   workspace: at least {name}_workspace_size(batch) bytes, used as scratch (not initialized)
 * Returns {name}_OK (0) or an error code ({name}_ERR_*). Nothing is allocated (kernel scratch is part
 * of the workspace) and a call uses less than {stack} bytes of stack. No global mutable state: calls
 * with separate workspaces may run concurrently from several threads. */
int {name}_predict(const float *input, int64_t batch, float *output, void *workspace);

/* predict() that also checks the workspace size: returns {name}_ERR_WORKSPACE_TOO_SMALL when
 * workspace_bytes < {name}_workspace_size(batch). */
int {name}_predict_checked(const float *input, int64_t batch, float *output, void *workspace,
                           size_t workspace_bytes);

/* Threads: predict() on up to `threads` cores of a pthread pool the library owns (created on the first
 * call that needs it; its workers sleep when idle and are joined when the library is unloaded).
 * {threads_doc}
 * Results are bit-identical to predict() for every batch and thread count. When another call is using
 * the pool, this call runs on the calling thread alone (a try-lock: it never waits); calls with
 * separate workspaces may run concurrently. threads == 1 is predict().
 * Checks: NULL pointers, then batch, then threads ({name}_ERR_BAD_THREADS), then (_checked) the size. */

/* Bytes of workspace predict_threads() needs for `batch` images on `threads` threads (one arena per
 * worker; for a large batch less than {name}_workspace_size(batch), since a chunk has at most 16 images);
 * 0 when batch or threads is out of range; equal to {name}_workspace_size(batch) for threads == 1. Never
 * decreasing in batch: a workspace sized for (B, T) serves every batch up to B with T threads. */
size_t {name}_workspace_size_threads(int64_t batch, int threads);

int {name}_predict_threads(const float *input, int64_t batch, float *output, void *workspace, int threads);

/* predict_threads() that also checks the workspace size: {name}_ERR_WORKSPACE_TOO_SMALL when
 * workspace_bytes < {name}_workspace_size_threads(batch, threads). */
int {name}_predict_threads_checked(const float *input, int64_t batch, float *output, void *workspace,
                                   size_t workspace_bytes, int threads);

#ifdef __cplusplus
}}
#endif

#endif /* {guard} */
"""


def c_string_literal(text: str) -> str:
    """`text` as a C string literal (printable ASCII kept, everything else as octal escapes)."""
    out = []
    for byte in str(text).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?' or not (" " <= ch <= "~"):
            out.append(f"\\{byte:03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _features_comment(features: str) -> str:
    """The LLVM feature string as wrapped header comment lines ('' when the CPU name says it all)."""
    if not features:
        return ""
    lines = textwrap.wrap(c_comment_text(features.replace(",", " ")), 96)
    return ("\n * LLVM features (later entries win; turning a feature off turns off those built on it):\n"
            + "\n".join(f" *   {line}" for line in lines))


def _float_chain_end(v, op):
    """The `op` node whose output reaches value v through single-input float ops (softmax, views), or None."""
    n = v.producer
    while n is not None and n.op != op and len(n.inputs) == 1 and n.inputs[0].type.dtype == "f32":
        n = n.inputs[0].producer
    return n if n is not None and n.op == op else None


def quantization_boundary(g) -> dict:
    """For an int8 graph with a float interface: {'input': (scale, zero_point, dtype)} when the input's only
    consumer is a quantize node, {'output': (...)} for the dequantize the float output is computed from."""
    found = {}
    x = g.inputs[0]
    users = [n for n in g.nodes if x in n.inputs]
    if len(users) == 1 and users[0].op == "quantize":
        a = users[0].attrs
        found["input"] = (a["scale"], a["zero_point"], a["dtype"])
    dq = _float_chain_end(g.outputs[0], "dequantize")
    if dq is not None:
        found["output"] = (dq.attrs["scale"], dq.attrs["zero_point"], dq.inputs[0].type.dtype)
    return found


QUANT_MACROS = {
    "input": "the float input is quantized inside, q = clamp(rint(x / SCALE) + ZERO_POINT)",
    "output": "the float output is computed from int8 values r = SCALE * (q - ZERO_POINT)"}


def render_quant_macros(name, boundary: dict) -> str:
    """#defines stating an int8 graph's boundary quantization (the C API itself stays float)."""
    lines = []
    for side, (scale, zero_point, dtype) in boundary.items():
        macro = f"{name}_{side.upper()}"
        lines += [f"/* int8 model: {QUANT_MACROS[side]} ({dtype}; ir/ops/quant.py) */",
                  # a hex literal: exactly the float32 the kernels use (no decimal rounding on the way)
                  f"#define {macro}_SCALE {float(np.float32(scale)).hex()}f  /* {float(np.float32(scale)):.9g} */",
                  f"#define {macro}_ZERO_POINT {int(zero_point)}",
                  f"#define {macro}_QUANT_TYPE {c_string_literal(dtype)}"]
    return "\n".join(lines) + "\n" if lines else ""


def _threads_doc(shape) -> str:
    """How this model's predict_threads() splits its work (header comment lines)."""
    if shape.splittable and shape.team:
        how = ("A batch of 2 or more is cut into chunks of min(16, ceil(batch / threads)) images, each run\n"
               " * by a free worker in its own arena; batch 1 splits the convolutions' output rows across the workers.")
    elif shape.splittable:
        how = ("A batch of 2 or more is cut into chunks of min(16, ceil(batch / threads)) images, each run\n"
               " * by a free worker in its own arena; batch 1 runs on the calling thread (no kernel worth splitting).")
    elif shape.team:
        how = ("This model couples the images of a batch, so the batch is not cut: the convolutions'\n"
               " * output rows are split across the workers.")
    else:
        how = "This build has no pool (or nothing to split): every call runs on the calling thread."
    return how


def render_header(name, graph_name, shape, target=None, boundary=None) -> str:
    """The text of NAME.h for a model with C name `name`; `target`: the jit.HostTarget the library was compiled for (default: the host)."""
    target = target or host_target()
    dims = shape.input_dims
    if len(dims) == 3:
        dim_lines = "\n".join(f"#define {name}_INPUT_{k} {d}" for k, d in zip("HWC", dims))
        batch_doc = f"shape (batch, {dims[0]}, {dims[1]}, {dims[2]})"
    else:
        dim_lines = f"/* input per image: {dims} */"
        batch_doc = f"shape (batch, {', '.join(map(str, dims))})"
    return HEADER.format(
        name=name, graph_name=c_comment_text(graph_name), guard=f"GRAPHCNN_{name.upper()}_H", dims=dim_lines,
        input_size=int(np.prod(dims, dtype=np.int64)), output_size=int(np.prod(shape.output_dims, dtype=np.int64)),
        per_image=shape.arena_per_sample, fixed=shape.arena_fixed, align=ALIGN,
        scratch_per_image=shape.scratch_per_sample, scratch_fixed=shape.scratch_fixed, stack=STACK_BOUND_BYTES,
        max_batch=shape.max_batch, quant_macros=render_quant_macros(name, boundary or {}),
        e_null=ERR_NULL_ARG, e_batch=ERR_BAD_BATCH, e_ws=ERR_WORKSPACE_TOO_SMALL, batch_doc=batch_doc,
        e_threads=ERR_BAD_THREADS, max_threads=MAX_THREADS, threads_doc=_threads_doc(shape),
        cpu_comment=c_comment_text(target.cpu), vector_bits=target.vector_bits,
        features_comment=_features_comment(target.features),
        cpu_literal=c_string_literal(target.cpu), features_literal=c_string_literal(target.features))


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
    """`cc -shared -o so_path obj -pthread -lm`, written atomically."""
    cc = find_c_compiler()
    folder = os.path.dirname(os.path.abspath(so_path))
    with tempfile.TemporaryDirectory(prefix=".gcnn-link-", dir=folder) as tmp:
        obj = os.path.join(tmp, "model.o")
        with open(obj, "wb") as f:
            f.write(obj_bytes)
        out = os.path.join(tmp, "model.so")
        cmd = [cc, "-shared", "-o", out, obj, f"-Wl,-soname,{soname}", "-pthread", "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise NativeExportError(f"linking {so_path} failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
        os.chmod(out, 0o755)
        os.replace(out, so_path)


def write_native(g, weights, folder, emit, target=None):
    """Write the artifacts named in `emit` (so, h, obj, llvm, asm) for inference graph `g` into `folder`.

    g must be an optimized inference graph with one batched f32 input and one batched f32 output;
    weights maps every param name to its array; `target` (a jit.HostTarget, see jit.export_target) is the
    CPU the code is generated for, default the host. Returns the list of written paths."""
    target = target or host_target()
    emit = list(emit)
    bad = [e for e in emit if e not in EMITS]
    if bad:
        raise ValueError(f"write_native: unknown emit kind(s) {bad} (choose from {', '.join(EMITS)})")
    if not emit:
        raise ValueError("write_native: emit is empty; nothing to write")
    os.makedirs(folder, exist_ok=True)
    module, name, shape = build_module(g, weights, target=target)
    written = []

    def path(ext):
        return os.path.join(folder, f"{name}.{ext}")

    if any(e in emit for e in ("so", "obj", "llvm", "asm")):
        tm = target_machine(3, reloc="pic", jit=False, target=target)
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
        _atomic_write(path("h"), render_header(name, g.name, shape, target,
                                                    quantization_boundary(g)).encode())
        written.append(path("h"))
    return written
