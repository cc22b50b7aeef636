"""The builder core of the LLVM backend's kernels: one `KernelBuilder` per generated function.

It owns the function (standard kernel ABI and attributes) and an `ir.IRBuilder`, and adds what every
kernel emitter needs on top of llvmlite:

- integer arithmetic that folds Python ints at generation time (`add`, `mul`, `i64`), so shapes known at
  compile time never reach the IR as instructions;
- counted loops (`for_range`) as a context manager producing phi-based loops, with loop-carried values
  (`Loop.carry`/`Loop.next`/`Loop.result`) and optional loop metadata (unroll / vectorize hints);
- strip-mined loops (`strips`): explicit vector strips of `lanes` floats plus a scalar tail from ONE body,
  with reductions carried in vector registers (in-place safe, no reliance on the loop vectorizer);
- float element access through opaque `ptr` (`gep`, `load`, `store`, `load_vec`, `store_vec`, masked
  `load_part`/`store_part` for partial vectors);
- constants and intrinsics that work on scalars and vectors alike (`const(0.5, like=x)`, `fma`,
  `maxnum`, `sqrt`, ...): the type of the first operand picks the overload (`llvm.fma.f32` or
  `llvm.fma.v8f32`);
- branch-free, overflow-free math written as plain IR (`exp`, `log`, `sigmoid`, `tanh`, `activation`), so
  loops calling them still vectorize (a libm call would block the loop vectorizer) and the compiled
  object needs no libm.

Example (out[i] = relu(x[i]) over n * 100 floats, vector strips plus a scalar tail):

    kb = KernelBuilder(module, "relu_k", 2, target, arg_names=("x", "out"))
    x, out = kb.args
    kb.strips(kb.mul(kb.n, 100), lambda s, acc: s.store(kb.relu(s.load(x)), out) or [])
    kb.finish()

and a counted loop with a carried value:

    with kb.for_range(kb.n) as loop:
        acc = loop.carry(kb.const(0.0))
        loop.next(acc, kb.b.fadd(acc, kb.load(x, loop.index)))
    total = loop.result(acc)

Kernel ABI: `void name(ptr a0, ..., ptr a{k-1}, i64 n)`, pointers to float32 data (or anything the kernel
documents), n the runtime batch size. Functions are `nounwind noinline` with `"prefer-vector-width"` set
from `target.vector_bits`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

from llvmlite import ir

from ir.ops import activations as activation_table

F32 = ir.FloatType()
F64 = ir.DoubleType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

# the activation table's names (ir/ops/activations.py); `KernelBuilder.activation` emits each of them
ACTIVATIONS = activation_table.NAMES

# Fast-math flags for float arithmetic whose reassociation is harmless (reductions the vectorizer may
# split into lanes: still deterministic for one compiled function, the loop order is fixed at compile time).
REASSOC = ("reassoc", "nsz")

IntLike = Union[int, ir.Value]

# Scratch chunks are aligned to this many bytes (a cache line, the widest vector).
SCRATCH_ALIGN_BYTES = 64


@dataclass(frozen=True)
class ScratchNeed:
    """Scratch bytes a kernel needs from its caller: `per_sample * n + fixed` (n = the batch argument)."""
    per_sample: int = 0
    fixed: int = 0

    def bytes(self, n: int) -> int:
        return self.per_sample * n + self.fixed


def scratch_need(fn: ir.Function) -> ScratchNeed:
    """What a finished kernel needs in its `scratch` argument (zero for kernels without one)."""
    return getattr(fn, "scratch_need", ScratchNeed())


def _align_floats(nfloats: int) -> int:
    step = SCRATCH_ALIGN_BYTES // 4
    return -(-nfloats // step) * step


def _float_type(ty: ir.Type) -> bool:
    return isinstance(ty, ir.FloatType) or (isinstance(ty, ir.VectorType) and isinstance(ty.element, ir.FloatType))


def _overload_suffix(ty: ir.Type) -> str:
    """Intrinsic name suffix for a float32 scalar or vector type: 'f32' or 'v8f32'."""
    if isinstance(ty, ir.FloatType):
        return "f32"
    if isinstance(ty, ir.VectorType) and isinstance(ty.element, ir.FloatType):
        return f"v{ty.count}f32"
    raise TypeError(f"expected a float32 scalar or vector value, got type {ty}")


def _element_bytes(etype: ir.Type) -> int:
    """Size (= the alignment the kernels assume) of one float32 or integer element."""
    return 4 if isinstance(etype, ir.FloatType) else etype.width // 8


def _vector_suffix(vty: ir.VectorType) -> str:
    """Intrinsic overload suffix of a vector type: 'v8f32', 'v16i8', 'v8i32'."""
    e = vty.element
    return f"v{vty.count}{'f32' if isinstance(e, ir.FloatType) else f'i{e.width}'}"


def add_string_attribute(fn: ir.Function, key: str, value: str) -> None:
    """Attach a string attribute `"key"="value"` to a function. llvmlite only validates enum attributes;
    a string attribute prints verbatim once it is in the attribute set's list of known names."""
    attr = f'"{key}"="{value}"'
    fn.attributes._known = fn.attributes._known | {attr}
    fn.attributes.add(attr)


def new_kernel_function(module: ir.Module, name: str, n_ptr_args: int, target, *,
                        batch_arg: bool = True, arg_names: Sequence[str] | None = None,
                        int_arg_names: Sequence[str] = ()) -> ir.Function:
    """Add `void name(ptr x n_ptr_args, i64 x len(int_arg_names)[, i64 n])` to module with the attributes every
    kernel carries (extra i64 arguments sit between the pointers and the batch size)."""
    if not isinstance(module, ir.Module):
        raise TypeError(f"module must be an llvmlite.ir.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in module.globals:
        raise ValueError(f"name {name!r} is already defined in the module")
    if not isinstance(n_ptr_args, int) or n_ptr_args < 0:
        raise ValueError(f"n_ptr_args must be a non-negative int, got {n_ptr_args!r}")
    bits = getattr(target, "vector_bits", None)
    if bits not in (128, 256, 512):
        raise ValueError(f"target.vector_bits must be 128, 256 or 512, got {bits!r}")
    args = [PTR] * n_ptr_args + [I64] * len(int_arg_names) + ([I64] if batch_arg else [])
    fn = ir.Function(module, ir.FunctionType(VOID, args), name=name)
    fn.attributes.add("nounwind")
    # A kernel runs once per graph node: inlining it into the graph function only costs compile time.
    fn.attributes.add("noinline")
    add_string_attribute(fn, "prefer-vector-width", str(bits))
    names = list(arg_names) if arg_names is not None else [f"a{i}" for i in range(n_ptr_args)]
    if len(names) != n_ptr_args:
        raise ValueError(f"arg_names has {len(names)} names for {n_ptr_args} pointer arguments")
    for arg, nm in zip(fn.args, names + list(int_arg_names) + (["n"] if batch_arg else [])):
        arg.name = nm
    return fn


class Loop:
    """A counted loop being emitted by `KernelBuilder.for_range`: `index` is the i64 induction value.

    Loop-carried values: `acc = loop.carry(init)` (a phi, valid inside the body), `loop.next(acc, new)`
    (the value for the next iteration; must be called once per carry), and after the `with` block
    `loop.result(acc)` (the value after the last iteration, `init` if the loop ran zero times)."""

    def __init__(self, kb: KernelBuilder, index: ir.Value, header: ir.Block, preheader: ir.Block):
        self.kb, self.index = kb, index
        self._header, self._preheader = header, preheader
        self._next: dict = {}
        self._init: dict = {}
        self._result: dict = {}
        self.closed = False

    def carry(self, init: ir.Value, name: str = "acc") -> ir.Value:
        if self.closed:
            raise RuntimeError("carry() must be called inside the loop's with-block")
        phi_builder = ir.IRBuilder(self._header)
        phi_builder.position_at_start(self._header)
        phi = phi_builder.phi(init.type, name=name)
        phi.add_incoming(init, self._preheader)
        main = self.kb.b
        if main.block is self._header:
            # llvmlite's builder keeps its insertion point as a list index: step over the new phi
            main._anchor += 1
        self._init[id(phi)] = (phi, init)
        return phi

    def next(self, carried: ir.Value, value: ir.Value) -> None:
        if id(carried) not in self._init:
            raise ValueError("next() takes a value returned by carry() of this loop")
        if value.type != carried.type:
            raise TypeError(f"next value has type {value.type}, the carried value {carried.type}")
        self._next[id(carried)] = value

    def result(self, carried: ir.Value) -> ir.Value:
        if not self.closed:
            raise RuntimeError("result() is only available after the loop's with-block")
        return self._result[id(carried)]


class IntFolding:
    """Integer index arithmetic on a builder `self.b` where Python ints fold at generation time, so fully
    static shapes produce no runtime index code. Shared by every kernel builder (KernelBuilder here and
    matmul.KernelContext)."""

    @staticmethod
    def i64(v: IntLike) -> ir.Value:
        return ir.Constant(I64, int(v)) if isinstance(v, int) else v

    def add(self, a: IntLike, c: IntLike) -> IntLike:
        if isinstance(a, int) and isinstance(c, int):
            return a + c
        if isinstance(c, int) and c == 0:
            return a
        if isinstance(a, int) and a == 0:
            return c
        return self.b.add(self.i64(a), self.i64(c))

    def mul(self, a: IntLike, c: IntLike) -> IntLike:
        if isinstance(a, int) and isinstance(c, int):
            return a * c
        if (isinstance(c, int) and c == 0) or (isinstance(a, int) and a == 0):
            return 0
        if isinstance(c, int) and c == 1:
            return a
        if isinstance(a, int) and a == 1:
            return c
        return self.b.mul(self.i64(a), self.i64(c))


class KernelBuilder(IntFolding):
    """An IR builder inside one new kernel function, plus helpers. `args` are the pointer arguments,
    `int_args` the extra i64 arguments, `n` the runtime batch size (None when built with batch_arg=False).
    Call `finish()` to return."""

    def __init__(self, module: ir.Module, name: str, n_ptr_args: int, target, *, batch_arg: bool = True,
                 arg_names: Sequence[str] | None = None, int_arg_names: Sequence[str] = (),
                 scratch_arg: bool = False):
        self.module, self.target = module, target
        names = list(arg_names) if arg_names is not None else [f"a{i}" for i in range(n_ptr_args)]
        if len(names) != n_ptr_args:
            raise ValueError(f"arg_names has {len(names)} names for {n_ptr_args} pointer arguments")
        self.fn = new_kernel_function(module, name, n_ptr_args + bool(scratch_arg), target, batch_arg=batch_arg,
                                      arg_names=names + (["scratch"] if scratch_arg else []),
                                      int_arg_names=int_arg_names)
        self.args = list(self.fn.args[:n_ptr_args])
        # the caller's scratch memory (a slice of the planned workspace); `scratch()` carves it up
        self.scratch_ptr = self.fn.args[n_ptr_args] if scratch_arg else None
        n_ptr_args += bool(scratch_arg)
        self.int_args = list(self.fn.args[n_ptr_args:n_ptr_args + len(int_arg_names)])
        self.n = self.fn.args[-1] if batch_arg else None
        self.lanes = target.vector_bits // 32
        self.entry = self.fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)
        # what for_range does when its `unroll` is None: None leaves unrolling to LLVM; emitters that
        # unroll by hand (the GEMM microkernel) set False, since LLVM re-unrolling their tile loops only
        # doubles compile time and code size
        self.default_unroll: bool | int | None = None
        self._scratch_per_sample = 0      # floats per unit of n, then fixed floats, handed out so far
        self._scratch_fixed = 0
        self._finished = False

    def finish(self) -> ir.Function:
        """Emit `ret void` and return the function (its ScratchNeed attached, see scratch_need())."""
        if self._finished:
            raise RuntimeError(f"kernel {self.fn.name} is already finished")
        self.b.ret_void()
        self._finished = True
        self.fn.scratch_need = ScratchNeed(4 * self._scratch_per_sample, 4 * self._scratch_fixed)
        return self.fn

    def scratch(self, nfloats: int, per_sample: bool = False) -> ir.Value:
        """A 64-byte aligned buffer of `nfloats` floats (times n with per_sample=True) carved from the
        caller's scratch argument: the planned workspace covers it, so a kernel never allocates (no
        malloc that can fail, no large stack frame). Layout of the scratch memory: the per-sample chunks
        (n * their sizes) first, then the fixed ones, so per-sample chunks must be requested first.
        Must be requested in the entry block, before any control flow."""
        if self.scratch_ptr is None:
            raise RuntimeError(f"kernel {self.fn.name} was built without a scratch argument")
        if self.b.block is not self.entry:
            raise RuntimeError("scratch buffers must be requested before the kernel's first loop")
        if not isinstance(nfloats, int) or isinstance(nfloats, bool) or nfloats < 0:
            raise ValueError(f"scratch: nfloats must be a non-negative int, got {nfloats!r}")
        size = _align_floats(nfloats)
        if per_sample:
            if self._scratch_fixed:
                raise RuntimeError("scratch: per-sample chunks must be requested before fixed ones")
            offset = self.mul(self.n, self._scratch_per_sample)
            self._scratch_per_sample += size
        else:
            offset = self.add(self.mul(self.n, self._scratch_per_sample) if self._scratch_per_sample else 0,
                              self._scratch_fixed)
            self._scratch_fixed += size
        return self.gep(self.scratch_ptr, offset)

    def linear_index(self, terms: Sequence[tuple[IntLike, IntLike]], base: IntLike = 0) -> IntLike:
        """base + sum(index * stride) with folding."""
        acc = base
        for idx, stride in terms:
            acc = self.add(acc, self.mul(idx, stride))
        return acc

    # -- memory -------------------------------------------------------------------------------------------
    def gep(self, ptr: ir.Value, index: IntLike, etype: ir.Type = F32) -> ir.Value:
        """Pointer to element `index` (of type etype, float32 by default) after `ptr`."""
        if isinstance(index, int) and index == 0:
            return ptr
        return self.b.gep(ptr, [self.i64(index)], inbounds=True, source_etype=etype)

    def load(self, ptr: ir.Value, index: IntLike = 0, typ: ir.Type = F32) -> ir.Value:
        """One element of type typ (float32 by default; i8/i32 for the int8 kernels) at ptr[index]."""
        etype = typ.element if isinstance(typ, ir.VectorType) else typ
        return self.b.load(self.gep(ptr, index, etype), typ=typ, align=_element_bytes(etype))

    def store(self, value: ir.Value, ptr: ir.Value, index: IntLike = 0) -> None:
        """Store a scalar at ptr[index], index counted in elements of the value's own type."""
        self.b.store(value, self.gep(ptr, index, value.type), align=_element_bytes(value.type))

    def vec_type(self, lanes: int | None = None, etype: ir.Type = F32) -> ir.VectorType:
        return ir.VectorType(etype, lanes or self.lanes)

    def load_vec(self, ptr: ir.Value, index: IntLike = 0, lanes: int | None = None,
                 etype: ir.Type = F32) -> ir.Value:
        """Unaligned load of `lanes` (default: one register) consecutive elements (floats unless etype
        says otherwise) at ptr[index]."""
        return self.b.load(self.gep(ptr, index, etype), typ=self.vec_type(lanes, etype),
                           align=_element_bytes(etype))

    def store_vec(self, value: ir.Value, ptr: ir.Value, index: IntLike = 0) -> None:
        etype = value.type.element
        self.b.store(value, self.gep(ptr, index, etype), align=_element_bytes(etype))

    def lane_mask(self, width: int, lanes: int | None = None) -> ir.Constant:
        """<lanes x i1> constant: the first `width` lanes true."""
        lanes = lanes or self.lanes
        return ir.Constant(ir.VectorType(I1, lanes), [1] * width + [0] * (lanes - width))

    def load_part(self, ptr: ir.Value, index: IntLike, width: int, lanes: int | None = None,
                  fill: float = 0.0, etype: ir.Type = F32) -> ir.Value:
        """Load `width` <= lanes elements (floats unless etype says otherwise) at ptr[index] into a vector;
        the other lanes are `fill` and touch no memory (llvm.masked.load), so a partial vector never reads
        past the end of a row."""
        lanes = lanes or self.lanes
        if width >= lanes:
            return self.load_vec(ptr, index, lanes, etype)
        vty = self.vec_type(lanes, etype)
        size = _element_bytes(etype)
        fn = self.declare(f"llvm.masked.load.{_vector_suffix(vty)}.p0", vty, [PTR, I32, ir.VectorType(I1, lanes), vty])
        fill_v = self.const(fill, like=vty) if etype == F32 else ir.Constant(vty, [int(fill)] * lanes)
        return self.b.call(fn, [self.gep(ptr, index, etype), ir.Constant(I32, size), self.lane_mask(width, lanes),
                                fill_v])

    def store_part(self, value: ir.Value, ptr: ir.Value, index: IntLike, width: int) -> None:
        """Store the first `width` lanes of `value` (a float or integer vector) at ptr[index]
        (llvm.masked.store when partial)."""
        lanes = value.type.count
        if width >= lanes:
            self.store_vec(value, ptr, index)
            return
        etype = value.type.element
        fn = self.declare(f"llvm.masked.store.{_vector_suffix(value.type)}.p0", VOID,
                          [value.type, PTR, I32, ir.VectorType(I1, lanes)])
        self.b.call(fn, [value, self.gep(ptr, index, etype), ir.Constant(I32, _element_bytes(etype)),
                         self.lane_mask(width, lanes)])

    def memcpy(self, dst: ir.Value, src: ir.Value, nfloats: IntLike) -> None:
        fn = self.declare("llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
        self.b.call(fn, [dst, src, self.i64(self.mul(nfloats, 4)), ir.Constant(I1, 0)])

    def memset_zero(self, ptr: ir.Value, nfloats: IntLike) -> None:
        fn = self.declare("llvm.memset.p0.i64", VOID, [PTR, I8, I64, I1])
        self.b.call(fn, [ptr, ir.Constant(I8, 0), self.i64(self.mul(nfloats, 4)), ir.Constant(I1, 0)])

    # -- control flow -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def for_range(self, count: IntLike, *, start: IntLike = 0, step: int = 1, name: str = "loop",
                  unroll: bool | int | None = None, vectorize: bool | None = None) -> Iterator[Loop]:
        """`for index in range(start, count, step)` as a guarded, bottom-tested phi loop.

        unroll: False disables LLVM's unroller for this loop, an int asks for that unroll count;
        vectorize: False forbids vectorizing it, True asks for it (both as llvm.loop metadata)."""
        if not isinstance(step, int) or step <= 0:
            raise ValueError(f"step must be a positive int, got {step!r}")
        if unroll is None:
            unroll = self.default_unroll
        b = self.b
        pre = b.block
        if isinstance(start, int) and isinstance(count, int) and start < count <= start + step:
            # exactly one trip: straight-line code with a constant index (no back edge for LLVM to
            # remove); carried values are single-incoming phis, which LLVM folds away
            header = self.fn.append_basic_block(name)
            b.branch(header)
            b.position_at_end(header)
            loop = Loop(self, ir.Constant(I64, start), header, pre)
            yield loop
            for key, (phi, init) in loop._init.items():
                if key not in loop._next:
                    raise RuntimeError(f"loop-carried value {phi.name} got no next() value")
                loop._result[key] = loop._next[key]
            loop.closed = True
            return
        header = self.fn.append_basic_block(name)
        exit_block = self.fn.append_basic_block(name + ".end")
        start_v, count_v = self.i64(start), self.i64(count)
        # which edges reach the exit block: the guard (zero trips) and/or the latch
        from_pre, from_latch = True, True
        if isinstance(start, int) and isinstance(count, int):
            if start >= count:
                # the loop never runs: a constant-false guard keeps the CFG (and phis) well formed and
                # LLVM drops the dead body
                b.cbranch(ir.Constant(I1, 0), header, exit_block)
            else:
                b.branch(header)
                from_pre = False
        else:
            b.cbranch(b.icmp_signed("<", start_v, count_v), header, exit_block)
        b.position_at_end(header)
        index = b.phi(I64, name="i")
        index.add_incoming(start_v, pre)
        loop = Loop(self, index, header, pre)
        yield loop
        nxt = b.add(index, ir.Constant(I64, step), flags=("nuw", "nsw"))
        latch = b.block
        index.add_incoming(nxt, latch)
        for key, (phi, init) in loop._init.items():
            if key not in loop._next:
                raise RuntimeError(f"loop-carried value {phi.name} got no next() value")
            phi.add_incoming(loop._next[key], latch)
        branch = b.cbranch(b.icmp_signed("<", nxt, count_v), header, exit_block)
        md = self._loop_metadata(unroll, vectorize)
        if md is not None:
            branch.set_metadata("llvm.loop", md)
        b.position_at_end(exit_block)
        for key, (phi, init) in loop._init.items():
            if from_pre and from_latch:
                out = b.phi(phi.type, name=phi.name + ".out")
                out.add_incoming(init, pre)
                out.add_incoming(loop._next[key], latch)
            else:
                out = init if from_pre else loop._next[key]
            loop._result[key] = out
        loop.closed = True

    def _loop_metadata(self, unroll, vectorize) -> ir.Value | None:
        """A fresh self-referential llvm.loop ID with the requested hints (None when there are none).
        llvmlite has no API for self-referential nodes, hence the operand patch."""
        mod = self.module
        hints = []
        if unroll is False:
            hints.append(mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")]))
        elif isinstance(unroll, int) and not isinstance(unroll, bool):
            hints.append(mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.count"),
                                           ir.Constant(I32, unroll)]))
        if vectorize is not None:
            hints.append(mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.vectorize.enable"),
                                           ir.Constant(I1, int(bool(vectorize)))]))
        if not hints:
            return None
        node = ir.values.MDValue(mod, hints, name=str(len(mod.metadata)))
        node.operands = (node, *hints)
        return node

    def if_then(self, cond: ir.Value):
        """`with kb.if_then(cond):` — plain llvmlite if_then (no else)."""
        return self.b.if_then(cond)

    # -- intrinsics -----------------------------------------------------------------------------------------
    def declare(self, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
        """The module's function `name`, declared on first use."""
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, list(args)), name=name)
        return fn

    def intrinsic(self, base: str, *args: ir.Value, fastmath: Sequence[str] = ()) -> ir.Value:
        """Call the float intrinsic llvm.<base> overloaded on the first argument's type (all arguments share it)."""
        ty = args[0].type
        fn = self.declare(f"llvm.{base}.{_overload_suffix(ty)}", ty, [ty] * len(args))
        return self.b.call(fn, list(args), fastmath=tuple(fastmath))

    def fma(self, a: ir.Value, x: ir.Value, c: ir.Value) -> ir.Value:
        """a * x + c, fused (one rounding)."""
        return self.intrinsic("fma", a, x, c)

    def maxnum(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.intrinsic("maxnum", a, c)

    def minnum(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.intrinsic("minnum", a, c)

    def fabs(self, x: ir.Value) -> ir.Value:
        return self.intrinsic("fabs", x)

    def sqrt(self, x: ir.Value) -> ir.Value:
        return self.intrinsic("sqrt", x)

    def floor(self, x: ir.Value) -> ir.Value:
        return self.intrinsic("floor", x)

    # -- float constants and vectors ------------------------------------------------------------------
    def const(self, value: float, like: ir.Value | ir.Type | None = None) -> ir.Constant:
        """A float32 constant of like's type (scalar f32 by default, or a splat vector)."""
        ty = like if isinstance(like, ir.Type) else (like.type if like is not None else F32)
        if isinstance(ty, ir.VectorType):
            return ir.Constant(ty, [float(value)] * ty.count)
        return ir.Constant(F32, float(value))

    def int_like(self, value: int, like: ir.Value) -> ir.Constant:
        """An i32 constant shaped like a float value (scalar i32 or i32 vector), for bit tricks."""
        ty = like.type
        if isinstance(ty, ir.VectorType):
            return ir.Constant(ir.VectorType(I32, ty.count), [value] * ty.count)
        return ir.Constant(I32, value)

    def _int_type_like(self, like: ir.Value) -> ir.Type:
        ty = like.type
        return ir.VectorType(I32, ty.count) if isinstance(ty, ir.VectorType) else I32

    def splat(self, scalar: ir.Value, lanes: int | None = None) -> ir.Value:
        lanes = lanes or self.lanes
        vty = ir.VectorType(scalar.type, lanes)
        v = self.b.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                     ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))

    def hsum(self, v: ir.Value) -> ir.Value:
        """Sum of a float vector's lanes (llvm.vector.reduce.fadd with reassoc: a fixed shuffle tree)."""
        ty = v.type
        fn = self.declare(f"llvm.vector.reduce.fadd.v{ty.count}f32", F32, [F32, ty])
        return self.b.call(fn, [self.const(-0.0), v], fastmath=("reassoc",))

    def hmax(self, v: ir.Value) -> ir.Value:
        """Largest lane of a float vector (llvm.vector.reduce.fmax; NaN lanes are ignored)."""
        ty = v.type
        fn = self.declare(f"llvm.vector.reduce.fmax.v{ty.count}f32", F32, [ty])
        return self.b.call(fn, [v])

    def iota(self, lanes: int | None = None) -> ir.Constant:
        """<lanes x i64> constant 0, 1, ..., lanes-1."""
        lanes = lanes or self.lanes
        return ir.Constant(ir.VectorType(I64, lanes), list(range(lanes)))

    # -- strip-mined loops: explicit vectors plus a scalar tail -------------------------------------------
    def strips(self, count: IntLike, body, inits: Sequence[ir.Value] = (), lane_reduce: Sequence = (),
               name: str = "strip") -> list[ir.Value]:
        """Visit indices [0, count) as vector strips of `lanes` consecutive elements, then the leftover
        elements: `body(strip, carried) -> new carried` runs once per strip with a `Strip` (vector or scalar
        view) and the loop-carried values.

        A compile-time count ends with ONE partial vector strip (masked loads and stores touch only its
        `width` real elements; carried lanes past `width` keep their value), so a row shorter than a
        register (a 10-wide softmax on 16 lanes) is still one vector operation. A runtime count ends with
        a scalar tail loop. Carried values are float32 scalars `inits` (each the identity of its reduction,
        as every vector lane starts from it); after the vector strips `lane_reduce[i](vector)` folds lanes
        into the scalar that seeds the tail loop. Returns the final scalars. The vector loop uses explicit
        vector IR, so in-place operation (out == an input) keeps full speed: LLVM's vectorizer would fall
        back to scalar code on its runtime alias check there. Loops are marked not to be vectorized again."""
        inits = list(inits)
        if len(lane_reduce) != len(inits):
            raise ValueError(f"strips: {len(inits)} carried values need as many lane_reduce functions, "
                             f"got {len(lane_reduce)}")
        lanes = self.lanes
        static = isinstance(count, int)
        main = count - count % lanes if static else self.b.and_(self.i64(count), self.i64(-lanes))
        carried = [self.splat(v, lanes) if not isinstance(v, ir.Constant) else self.const(v.constant, like=self.vec_type())
                   for v in inits]
        if not static or main > 0:
            with self.for_range(main, step=lanes, name=name, vectorize=False) as loop:
                acc = [loop.carry(v) for v in carried]
                new = list(body(Strip(self, loop.index, lanes), acc) or [])
                for a, v in zip(acc, new):
                    loop.next(a, v)
            carried = [loop.result(a) for a in acc]
        if static:
            rest = count - main
            if rest:
                new = list(body(Strip(self, self.i64(main), lanes, width=rest), list(carried)) or [])
                keep = self.lane_mask(rest)
                carried = [self.b.select(keep, v, a) for a, v in zip(carried, new)]
            return [reduce(v) for reduce, v in zip(lane_reduce, carried)]
        scalars = [reduce(v) for reduce, v in zip(lane_reduce, carried)]
        with self.for_range(count, start=main, name=name + ".tail", vectorize=False) as loop:
            acc = [loop.carry(v) for v in scalars]
            new = list(body(Strip(self, loop.index, None), acc) or [])
            for a, v in zip(acc, new):
                loop.next(a, v)
        return [loop.result(a) for a in acc]

    # -- math on f32 scalars or vectors (plain IR: vectorizable, no libm) -----------------------------
    def exp(self, x: ir.Value) -> ir.Value:
        """exp(x), Cephes expf: x = n*ln2 + r (Cody-Waite), degree-6 polynomial for e^r, 2^n from the
        exponent bits; <= 2 ulp. Saturates: x > 88.376 gives +inf, x < -87.33 gives 0 (denormal results
        flush to zero), NaN propagates."""
        b = self.b
        c = lambda v: self.const(v, like=x)
        # hi keeps 2^n below the exponent limit (n <= 127); lo = ln(FLT_MIN) keeps it normal (n >= -126)
        hi, lo = 88.3762626647949, -87.33654022216797
        xc = self.minnum(self.maxnum(x, c(lo)), c(hi))
        fx = self.floor(self.fma(xc, c(1.44269504088896341), c(0.5)))
        r = self.fma(fx, c(-0.693359375), xc)
        r = self.fma(fx, c(2.12194440e-4), r)
        y = c(1.9875691500e-4)
        for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            y = self.fma(y, r, c(k))
        y = self.fma(y, b.fmul(r, r), b.fadd(r, c(1.0)))
        ity = self._int_type_like(x)
        # fx is in [-126, 127]: 2^fx straight from the exponent bits
        e = b.add(b.fptosi(fx, ity), self.int_like(127, x))
        scale = b.bitcast(b.shl(e, self.int_like(23, x)), x.type)
        res = b.fmul(y, scale)
        res = b.select(b.fcmp_ordered(">", x, c(hi)), c(float("inf")), res)
        res = b.select(b.fcmp_ordered("<", x, c(lo)), c(0.0), res)
        return b.select(b.fcmp_unordered("uno", x, x), x, res)

    def log(self, x: ir.Value) -> ir.Value:
        """Natural log, Cephes logf (~1 ulp) for positive normal x; log(0) = -inf, log(x<0) = NaN, log(inf)
        = inf. Positive denormals are treated as 0 (-inf): every caller here passes clipped or >= 1 values."""
        b = self.b
        c = lambda v: self.const(v, like=x)
        ity = self._int_type_like(x)
        bits = b.bitcast(x, ity)
        # x = m * 2^e with m in [0.5, 1)
        e = b.sitofp(b.sub(b.lshr(bits, self.int_like(23, x)), self.int_like(126, x)), x.type)
        m = b.bitcast(b.or_(b.and_(bits, self.int_like(0x007FFFFF, x)), self.int_like(0x3F000000, x)), x.type)
        small = b.fcmp_ordered("<", m, c(0.707106781186547524))
        e = b.select(small, b.fsub(e, c(1.0)), e)
        m = b.fsub(b.select(small, b.fadd(m, m), m), c(1.0))
        z = b.fmul(m, m)
        y = c(7.0376836292e-2)
        for k in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                  2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
            y = self.fma(y, m, c(k))
        y = b.fmul(b.fmul(y, m), z)
        y = self.fma(e, c(-2.12194440e-4), y)
        y = self.fma(z, c(-0.5), y)
        res = b.fadd(m, y)
        res = self.fma(e, c(0.693359375), res)
        res = b.select(b.fcmp_ordered("<", x, c(1.1754943508222875e-38)), c(float("-inf")), res)
        res = b.select(b.fcmp_ordered("<", x, c(0.0)), c(float("nan")), res)
        res = b.select(b.fcmp_ordered("==", x, c(float("inf"))), x, res)
        return b.select(b.fcmp_unordered("uno", x, x), x, res)

    def relu(self, x: ir.Value) -> ir.Value:
        """max(x, 0); NaN stays NaN (like np.maximum)."""
        zero = self.const(0.0, like=x)
        return self.b.select(self.b.fcmp_ordered("<", x, zero), zero, x)

    def maximum(self, a: ir.Value, x: ir.Value) -> ir.Value:
        """max(a, x) with NaN propagating from either side, like np.maximum (llvm.maxnum would drop it):
        an ordered '>' select (one vmaxps) plus a NaN check of a."""
        b = self.b
        m = b.select(b.fcmp_ordered(">", a, x), a, x)       # x when either is NaN
        return b.select(b.fcmp_unordered("uno", a, a), a, m)

    def relu_grad(self, y: ir.Value, dy: ir.Value) -> ir.Value:
        """dy * (y > 0) for y the relu output: a multiply (not a select), so NaN/inf in dy propagate and
        the standalone kernel and the fused GEMM epilogue give the same bits."""
        one, zero = self.const(1.0, like=y), self.const(0.0, like=y)
        return self.b.fmul(dy, self.b.select(self.b.fcmp_ordered(">", y, zero), one, zero))

    def sigmoid(self, x: ir.Value) -> ir.Value:
        """1 / (1 + exp(-x)) without overflow: e = exp(-|x|) in (0, 1], s = 1/(1+e), result s for x >= 0 and
        e*s for x < 0 (both a few ulp, also for very negative x)."""
        b = self.b
        one = self.const(1.0, like=x)
        e = self.exp(b.fneg(self.fabs(x)))
        s = b.fdiv(one, b.fadd(one, e))
        return b.select(b.fcmp_ordered("<", x, self.const(0.0, like=x)), b.fmul(e, s), s)

    def tanh(self, x: ir.Value) -> ir.Value:
        """tanh(x), Cephes tanhf: an odd polynomial for |x| < 0.625 (no cancellation near 0), else
        sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 0.29] (no overflow). A few ulp."""
        b = self.b
        c = lambda v: self.const(v, like=x)
        ax = self.fabs(x)
        e = self.exp(b.fmul(ax, c(-2.0)))
        big = b.fdiv(b.fsub(c(1.0), e), b.fadd(c(1.0), e))
        z = b.fmul(x, x)
        p = c(-5.70498872745e-3)
        for k in (2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1):
            p = self.fma(p, z, c(k))
        small = self.fma(b.fmul(p, z), x, x)
        # tanh is odd: the sign of x (also of -0.0) goes onto the magnitude computed either way
        return self.intrinsic("copysign", b.select(b.fcmp_ordered("<", ax, c(0.625)), small, big), x)

    def minimum(self, a: ir.Value, x: ir.Value) -> ir.Value:
        """min(a, x) with NaN propagating from either side, like np.minimum."""
        b = self.b
        m = b.select(b.fcmp_ordered("<", a, x), a, x)       # x when either is NaN
        return b.select(b.fcmp_unordered("uno", a, a), a, m)

    def leaky_relu(self, x: ir.Value, alpha: float) -> ir.Value:
        """x where x > 0, else alpha * x (NaN stays NaN), as the table's NumPy function."""
        b = self.b
        return b.select(b.fcmp_ordered(">", x, self.const(0.0, like=x)), x, b.fmul(x, self.const(alpha, like=x)))

    def clip(self, x: ir.Value, min_value: float | None, max_value: float | None) -> ir.Value:
        """max(x, min_value) then min(., max_value), NaN propagating; a None bound is no bound."""
        if min_value is not None:
            x = self.maximum(x, self.const(min_value, like=x))
        if max_value is not None:
            x = self.minimum(x, self.const(max_value, like=x))
        return x

    def activation(self, kind: str, x: ir.Value, params=()) -> ir.Value:
        """Apply the table activation `kind` with `params` ((name, value) pairs, table order; defaults
        filled in when missing) to a float32 scalar or vector. The one implementation of every
        activation: standalone kernels and fused GEMM epilogues both call it."""
        kind, p = check_activation(kind, params)
        p = dict(p)
        if kind == "linear":
            return x
        if kind == "relu":
            return self.relu(x)
        if kind == "sigmoid":
            return self.sigmoid(x)
        if kind == "tanh":
            return self.tanh(x)
        if kind == "leaky_relu":
            return self.leaky_relu(x, p["alpha"])
        if kind == "clip":
            return self.clip(x, p["min_value"], p["max_value"])
        raise NotImplementedError(f"activation {kind!r} is in the table but has no LLVM code")

    def activation_grad(self, kind: str, y: ir.Value, dy: ir.Value, params=()) -> ir.Value:
        """dy * slope(y) for the table activation `kind`, y its output (the `<kind>_grad` op): the same
        operations, in the same order, as the table's NumPy gradient."""
        kind, p = check_activation(kind, params)
        p = dict(p)
        b = self.b
        one, zero = self.const(1.0, like=y), self.const(0.0, like=y)
        if kind == "linear":
            return dy
        if kind == "relu":
            return self.relu_grad(y, dy)
        if kind == "sigmoid":
            return b.fmul(dy, b.fmul(b.fsub(one, y), y))
        if kind == "tanh":
            return b.fmul(dy, b.fsub(one, b.fmul(y, y)))
        if kind == "leaky_relu":
            return b.fmul(dy, b.select(b.fcmp_ordered(">", y, zero), one, self.const(p["alpha"], like=y)))
        if kind == "clip":
            inside = ir.Constant(I1, 1)
            if isinstance(y.type, ir.VectorType):
                inside = ir.Constant(ir.VectorType(I1, y.type.count), [1] * y.type.count)
            if p["min_value"] is not None:
                inside = b.and_(inside, b.fcmp_ordered(">", y, self.const(p["min_value"], like=y)))
            if p["max_value"] is not None:
                inside = b.and_(inside, b.fcmp_ordered("<", y, self.const(p["max_value"], like=y)))
            return b.fmul(dy, b.select(inside, one, zero))
        raise NotImplementedError(f"activation {kind!r} is in the table but has no LLVM gradient code")


class Strip:
    """One strip of `KernelBuilder.strips`: `lanes` consecutive elements starting at `index` (a vector
    strip; with `width` < lanes only the first `width` are real and loads/stores of the others are masked
    off), or the single element `index` (lanes None: a scalar tail step). Loads, stores and constants take
    the strip's shape, so one body emits the vector loop, the partial vector and the scalar tail."""

    def __init__(self, kb: KernelBuilder, index: ir.Value, lanes: int | None, width: int | None = None):
        self.kb, self.index, self.lanes = kb, index, lanes
        self.width = lanes if width is None else width

    @property
    def float_type(self) -> ir.Type:
        return self.kb.vec_type(self.lanes) if self.lanes else F32

    def at(self, offset: IntLike = 0) -> IntLike:
        return self.kb.add(offset, self.index)

    def load(self, ptr: ir.Value, offset: IntLike = 0, etype: ir.Type = F32) -> ir.Value:
        """ptr[offset + index ...]: a vector (lanes past `width` read as 0, no memory touched) or one
        element (a float unless etype says otherwise)."""
        if self.lanes:
            return self.kb.load_part(ptr, self.at(offset), self.width, self.lanes, etype=etype)
        return self.kb.load(ptr, self.at(offset), etype)

    def store(self, value: ir.Value, ptr: ir.Value, offset: IntLike = 0) -> None:
        if self.lanes:
            self.kb.store_part(value, ptr, self.at(offset), self.width)
        else:
            self.kb.store(value, ptr, self.at(offset))

    def const(self, value: float) -> ir.Constant:
        return self.kb.const(value, like=self.float_type)

    def broadcast(self, scalar: ir.Value) -> ir.Value:
        """A float32 scalar as a value of the strip's shape."""
        if not self.lanes:
            return scalar
        if isinstance(scalar, ir.Constant):
            return self.kb.const(scalar.constant, like=self.float_type)
        return self.kb.splat(scalar, self.lanes)

    def indices(self, offset: IntLike = 0) -> ir.Value:
        """The i64 element indices offset + index (+ 0..lanes-1 for a vector strip)."""
        start = self.kb.i64(self.at(offset))
        if not self.lanes:
            return start
        return self.kb.b.add(self.kb.splat(start, self.lanes), self.kb.iota(self.lanes))


def check_activation(kind: str, params=()) -> tuple[str, tuple]:
    """(name, canonical parameters) of a table activation (None means linear); ValueError otherwise."""
    try:
        return activation_table.resolve(kind, params, "activation")
    except Exception as e:      # IRError: kernels report bad arguments as ValueError
        raise ValueError(str(e)) from None
