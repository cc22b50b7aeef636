"""A native thread pool for intra-op parallelism (one image on several cores), generated as LLVM IR.

The same IR serves the JIT runtime (a process-wide pool module, `process_pool()`) and the exported
`.so` (the library owns its pool: export.py adds these functions to the model's module).

    team       one global struct per pool (layout: the slot constants below)
    workers    persistent pthreads created on demand (pthread_create from the generated code); an idle
               worker spins on the generation counter for a short while, then sleeps in futex(WAIT), so an
               idle pool burns no core
    run        `gcpool_run(team_fn, args, n, arena, first, parts) -> i32`: takes the pool with a try-lock
               (returns 0 at once when another call holds it: that caller then runs single-threaded, so
               concurrent callers never wait on each other or deadlock), publishes the job, wakes sleepers,
               runs worker 0 itself, returns 1
    team entry `void gc_NAME_team(ptr team, i64 worker)` (codegen.lower_graph): every worker runs the whole
               graph; split kernels work on their part, other nodes run on worker 0 only, `barrier` between

The exported .so builds its pool with own_lifecycle (joinable workers, a destructor joining them, an
atfork reset) and claim_lines (work claimed through atomic counters instead of static parts and
barriers; see define_pool), so a worker the OS has not scheduled never holds a call up.

The barrier is a sense-reversing spin barrier (atomic arrive count + phase), with sched_yield after a
spin budget so an oversubscribed machine still makes progress. Linux x86-64 only (futex syscall number,
`pause`); `available()` says whether this host can use it.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

from llvmlite import ir as ll

I32, I64, PTR, VOID = ll.IntType(32), ll.IntType(64), ll.PointerType(), ll.VoidType()

# team slots (i64 each); hot fields on their own 64-byte line
GEN = 0          # i32 futex word: bumped once per job
SLEEPERS = 1     # workers inside futex(WAIT)
BUSY = 2         # try-lock: one call at a time
WORKERS = 3      # pthreads created so far (ids 1..WORKERS)
PARTS = 4        # workers taking part in the current job (including the caller, worker 0)
FN, ARGS, N, ARENA, FIRST = 5, 6, 7, 8, 9
STOP = 10        # own_lifecycle pools: set by PREFIX_stop, workers seeing it exit
INSIDE = 11      # claim pools: workers inside the current job
CLOSED = 12      # claim pools: the caller finished the job; a worker arriving now leaves it alone
ARRIVED = 16     # barrier arrive count
PHASE = 24       # barrier phase
TEAM_SLOTS = 32
# claim pools: after the 32 slots, one 64-byte line per work item (a split node, or the chunks of a chunked
# call), zeroed by `run` before each job: next piece to claim, pieces done, ready (worker 0 reached it)
LINE_SLOTS, CLAIM, DONE, READY = 8, 0, 1, 2

MAX_THREADS = 64
# a batch split across threads goes in chunks of at most CHUNK_IMAGES images, claimed one at a time (the
# exported .so's pool and the JIT runtime's batch split alike): small enough that a fast thread takes over a
# slow one's share and each chunk's arena stays cache-sized, large enough that a chunk's fixed cost stays ~1%
CHUNK_IMAGES = 16


def chunk_images(batch: int, threads: int) -> int:
    """Images per chunk of a batch split across threads: min(CHUNK_IMAGES, ceil(batch / threads))."""
    return min(CHUNK_IMAGES, -(-batch // threads))
SPIN_BEFORE_SLEEP = 1 << 17      # pause iterations an idle worker spins (~ a few ms) before it sleeps
SPIN_BEFORE_YIELD = 1 << 10      # pause iterations in a barrier between sched_yield calls
SYS_FUTEX, FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 202, 128, 129


def available() -> bool:
    """True where the generated pool works: Linux on x86-64."""
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def intra_op_enabled() -> bool:
    """Intra-op parallelism is opt-in: GRAPHCNN_INTRA_OP=1 (and a host the pool supports)."""
    return os.environ.get("GRAPHCNN_INTRA_OP", "") == "1" and available()


def team_arena_bytes(layout, n: int, parts: int) -> int:
    """Arena bytes of a team call: the planned values, then one 64-byte aligned scratch region per worker
    (worker w's at scratch_offset + w * scratch_stride)."""
    ps, fx = layout.scratch_offset()
    return n * ps + fx + parts * scratch_stride(layout, n)


def scratch_stride(layout, n: int) -> int:
    return -(-(n * layout.scratch_per_sample + layout.scratch_fixed) // 64) * 64


def _store_atomic(b, value, ptr, ordering):
    """An atomic store through an opaque pointer (llvmlite's store_atomic checks a typed pointee)."""
    b._insert(ll.instructions.StoreAtomicInstr(b.block, value, ptr, ordering, value.type.width // 8))


def _slot(b, team, k):
    return b.gep(team, [ll.Constant(I64, k)], inbounds=True, source_etype=I64)


def _declare(module, name, ret, args, var_arg=False):
    fn = module.globals.get(name)
    if fn is None:
        fn = ll.Function(module, ll.FunctionType(ret, args, var_arg=var_arg), name=name)
    return fn


def _pause(b, module):
    b.call(_declare(module, "llvm.x86.sse2.pause", VOID, []), [])


def line_slot(b, team, line, field):
    """Pointer to field CLAIM/DONE/READY of work-item line `line` (an int or an i64 value)."""
    k = ll.Constant(I64, line) if isinstance(line, int) else line
    return b.gep(team, [b.add(b.mul(k, ll.Constant(I64, LINE_SLOTS)), ll.Constant(I64, TEAM_SLOTS + field))],
                 inbounds=True, source_etype=I64)


def spin_until(b, fn, module, ptr, done_if, label):
    """Spin (pause; sched_yield every SPIN_BEFORE_YIELD pauses) until done_if(atomic acquire load of the i64
    at ptr) holds; the builder continues in the block after the wait."""
    entry = b.block
    loop, spin, yld, done = (fn.append_basic_block(f"{label}_{s}") for s in ("loop", "spin", "yield", "done"))
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I64)
    i.add_incoming(ll.Constant(I64, 0), entry)
    now = b.load_atomic(ptr, "acquire", 8, typ=I64)
    b.cbranch(done_if(now), done, spin)
    b.position_at_end(spin)
    _pause(b, module)
    nxt = b.add(i, ll.Constant(I64, 1))
    b.cbranch(b.icmp_unsigned("==", nxt, ll.Constant(I64, SPIN_BEFORE_YIELD)), yld, loop)
    i.add_incoming(nxt, spin)
    b.position_at_end(yld)
    b.call(_declare(module, "sched_yield", I32, []), [])
    b.branch(loop)
    i.add_incoming(ll.Constant(I64, 0), yld)
    b.position_at_end(done)


def count_loop(b, fn, start, stop, body, label):
    """for k in [start, stop) (i64, signed compare): body(k); the builder continues after the loop."""
    entry = b.block
    top, inside, done = (fn.append_basic_block(f"{label}_{s}") for s in ("top", "body", "done"))
    b.branch(top)
    b.position_at_end(top)
    k = b.phi(I64)
    k.add_incoming(start, entry)
    b.cbranch(b.icmp_signed("<", k, stop), inside, done)
    b.position_at_end(inside)
    body(k)
    k.add_incoming(b.add(k, ll.Constant(I64, 1)), b.block)
    b.branch(top)
    b.position_at_end(done)


def claim_loop(b, fn, module, team, line, pieces, body, label):
    """while ((p = CLAIM++) < pieces) { body(p); DONE++ } for work-item `line` (dynamic claiming: a worker
    that comes late, or never, leaves its pieces to the others)."""
    entry = b.block
    top, work, out = (fn.append_basic_block(f"{label}_{s}") for s in ("claim", "work", "claimed"))
    b.branch(top)
    b.position_at_end(top)
    p = b.atomic_rmw("add", line_slot(b, team, line, CLAIM), ll.Constant(I64, 1), "monotonic")
    b.cbranch(b.icmp_unsigned("<", p, pieces), work, out)
    b.position_at_end(work)
    body(p)
    b.atomic_rmw("add", line_slot(b, team, line, DONE), ll.Constant(I64, 1), "release")
    b.branch(top)
    b.position_at_end(out)
    del entry


def wait_done(b, fn, module, team, line, pieces, label):
    """Wait until every piece of work-item `line` is done (acquire: their writes are visible)."""
    spin_until(b, fn, module, line_slot(b, team, line, DONE), lambda v: b.icmp_unsigned(">=", v, pieces), label)


def team_field(b, team, k, typ=I64):
    """Load one job field of the team (plain load: published before the generation bump)."""
    v = b.load(_slot(b, team, k), typ=I64)
    return b.inttoptr(v, PTR) if isinstance(typ, ll.PointerType) else v


def define_barrier(module, name="gcpool_barrier") -> ll.Function:
    """internal void barrier(ptr team): wait until all PARTS workers of the current job arrived."""
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fn = ll.Function(module, ll.FunctionType(VOID, [PTR]), name=name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    fn.attributes.add("noinline")
    (team,) = fn.args
    b = ll.IRBuilder(fn.append_basic_block("entry"))
    parts = team_field(b, team, PARTS)
    phase = b.load_atomic(_slot(b, team, PHASE), "acquire", 8, typ=I64)
    old = b.atomic_rmw("add", _slot(b, team, ARRIVED), ll.Constant(I64, 1), "acq_rel")
    last, wait = fn.append_basic_block("last"), fn.append_basic_block("wait")
    b.cbranch(b.icmp_unsigned("==", old, b.sub(parts, ll.Constant(I64, 1))), last, wait)
    b.position_at_end(last)
    _store_atomic(b, ll.Constant(I64, 0), _slot(b, team, ARRIVED), "monotonic")
    _store_atomic(b, b.add(phase, ll.Constant(I64, 1)), _slot(b, team, PHASE), "release")
    b.ret_void()
    # wait: spin on the phase; every SPIN_BEFORE_YIELD pauses give the core away once
    b.position_at_end(wait)
    spin_until(b, fn, module, _slot(b, team, PHASE), lambda now: b.icmp_unsigned("!=", now, phase), "phase")
    b.ret_void()
    return fn


def define_pool(module, prefix="gcpool", own_lifecycle=False, claim_lines=0) -> ll.Function:
    """Add the pool (its team global, the worker main and `PREFIX_run`) to module; returns PREFIX_run:
    i32 run(ptr team_fn, ptr args, i64 n, ptr arena, i64 first, i64 parts) -> 1 when the job ran on the
    pool, 0 when the pool is busy or has no worker (the caller runs the single-threaded entry instead).

    own_lifecycle (the exported .so, whose code can be unloaded): workers are joinable (their ids kept in
    PREFIX_tids) and a module destructor `PREFIX_stop` wakes them with STOP set and joins them (skipped
    when a call holds the pool at that moment); a constructor registers `PREFIX_forked` with
    pthread_atfork, which resets the pool in a forked child (a child has none of the parent's workers).
    Without it (the JIT's process pool) workers are detached and live as long as the process.

    claim_lines > 0 (the exported .so): team functions claim their work dynamically (claim_loop over the
    work-item lines, zeroed here before each job), so the caller never waits for a worker that was not
    scheduled: a worker enters a job only by INSIDE += 1 while CLOSED is 0 (read after the increment);
    `run` clears CLOSED only after publishing the job's fields, sets it once worker 0 returns and waits only
    for workers INSIDE. A worker that wakes late finds CLOSED set, or a later job whose fields it then
    reads consistently (CLOSED == 0 is read with seq_cst after they were written)."""
    team_ty = ll.ArrayType(I64, TEAM_SLOTS + LINE_SLOTS * claim_lines)
    team_global = ll.GlobalVariable(module, team_ty, name=f"{prefix}_team")
    team_global.linkage = "internal"
    # a claim pool is CLOSED between jobs (run opens it after publishing a job's fields)
    team_global.initializer = ll.Constant(team_ty, [ll.Constant(I64, int(claim_lines > 0 and k == CLOSED))
                                                    for k in range(team_ty.count)])
    team_global.align = 64
    team_global.type = PTR      # llvmlite still types globals; the backend uses opaque `ptr`
    syscall = _declare(module, "syscall", I64, [I64], var_arg=True)
    c = lambda v: ll.Constant(I64, v)
    null = ll.Constant(PTR, None)
    team_fn_ty = ll.FunctionType(VOID, [PTR, I64])

    # worker main: ptr worker(ptr arg), arg = (id << 32) | generation at creation
    wm = ll.Function(module, ll.FunctionType(PTR, [PTR]), name=f"{prefix}_worker")
    wm.linkage = "internal"
    wm.attributes.add("nounwind")
    b = ll.IRBuilder(wm.append_basic_block("entry"))
    team = team_global
    arg = b.ptrtoint(wm.args[0], I64)
    wid = b.lshr(arg, c(32))
    seen0 = b.trunc(arg, I32)
    gen_ptr = _slot(b, team, GEN)
    entry = b.block
    top, spin, spun, sleep, sleep_call, slept, run, call, after = (
        wm.append_basic_block(s) for s in ("top", "spin", "spun", "sleep", "sleep_call", "slept", "run", "call",
                                           "after"))
    b.branch(top)
    # top: (seen, i) -> spin on GEN
    b.position_at_end(top)
    seen = b.phi(I32)
    i = b.phi(I64)
    g = b.load_atomic(gen_ptr, "acquire", 4, typ=I32)
    b.cbranch(b.icmp_unsigned("!=", g, seen), run, spin)
    b.position_at_end(spin)
    _pause(b, module)
    i1 = b.add(i, c(1))
    b.cbranch(b.icmp_unsigned("==", i1, c(SPIN_BEFORE_SLEEP)), sleep, spun)
    b.position_at_end(spun)
    b.branch(top)
    # sleep: announce, re-check, futex(WAIT) while the generation is still `seen`
    b.position_at_end(sleep)
    b.atomic_rmw("add", _slot(b, team, SLEEPERS), c(1), "seq_cst")
    g2 = b.load_atomic(gen_ptr, "seq_cst", 4, typ=I32)
    b.cbranch(b.icmp_unsigned("==", g2, seen), sleep_call, slept)
    b.position_at_end(sleep_call)
    b.call(syscall, [c(SYS_FUTEX), gen_ptr, c(FUTEX_WAIT_PRIVATE), b.zext(seen, I64), null, null, c(0)])
    b.branch(slept)
    b.position_at_end(slept)
    b.atomic_rmw("sub", _slot(b, team, SLEEPERS), c(1), "seq_cst")
    b.branch(top)
    # run the job if this worker takes part
    b.position_at_end(run)
    if own_lifecycle:
        live, leave = wm.append_basic_block("live"), wm.append_basic_block("leave")
        stop = b.load_atomic(_slot(b, team, STOP), "acquire", 8, typ=I64)
        b.cbranch(b.icmp_unsigned("!=", stop, c(0)), leave, live)
        b.position_at_end(leave)
        b.ret(null)
        b.position_at_end(live)
    if claim_lines:
        enter, leave_job = wm.append_basic_block("enter"), wm.append_basic_block("leave_job")
        b.atomic_rmw("add", _slot(b, team, INSIDE), c(1), "seq_cst")
        closed = b.load_atomic(_slot(b, team, CLOSED), "seq_cst", 8, typ=I64)
        b.cbranch(b.icmp_unsigned("!=", closed, c(0)), leave_job, enter)
        b.position_at_end(enter)
    parts = team_field(b, team, PARTS)
    b.cbranch(b.icmp_unsigned("<", wid, parts), call, leave_job if claim_lines else after)
    b.position_at_end(call)
    fnp = team_field(b, team, FN, PTR)
    b.call(indirect_callee(fnp, team_fn_ty), [team, wid])
    b.branch(leave_job if claim_lines else after)
    if claim_lines:
        b.position_at_end(leave_job)
        b.atomic_rmw("sub", _slot(b, team, INSIDE), c(1), "seq_cst")
        b.branch(after)
    b.position_at_end(after)
    after_run = b.block
    b.branch(top)
    seen.add_incoming(seen0, entry)
    seen.add_incoming(seen, spun)
    seen.add_incoming(seen, slept)
    seen.add_incoming(g, after_run)
    i.add_incoming(c(0), entry)
    i.add_incoming(i1, spun)
    i.add_incoming(c(0), slept)
    i.add_incoming(c(0), after_run)

    # run
    pthread_create = _declare(module, "pthread_create", I32, [PTR, PTR, PTR, PTR])
    pthread_detach = _declare(module, "pthread_detach", I32, [I64])
    if own_lifecycle:
        tids_ty = ll.ArrayType(I64, MAX_THREADS + 1)
        tids = ll.GlobalVariable(module, tids_ty, name=f"{prefix}_tids")
        tids.linkage = "internal"
        tids.initializer = ll.Constant(tids_ty, None)
        tids.type = PTR
    run_fn = ll.Function(module, ll.FunctionType(I32, [PTR, PTR, I64, PTR, I64, I64]), name=f"{prefix}_run")
    run_fn.attributes.add("nounwind")
    fn_arg, args, n, arena, first, want = run_fn.args
    b = ll.IRBuilder(run_fn.append_basic_block("entry"))
    team = team_global
    got = b.cmpxchg(_slot(b, team, BUSY), c(0), c(1), "acquire", "monotonic")
    mine, busy = run_fn.append_basic_block("mine"), run_fn.append_basic_block("busy")
    b.cbranch(b.extract_value(got, 1), mine, busy)
    b.position_at_end(busy)
    b.ret(ll.Constant(I32, 0))
    b.position_at_end(mine)
    want = b.select(b.icmp_signed(">", want, c(MAX_THREADS)), c(MAX_THREADS), want)
    gen_now = b.load_atomic(_slot(b, team, GEN), "monotonic", 4, typ=I32)
    tid = b.alloca(I64)
    tid.type = PTR
    # grow: create workers WORKERS+1 .. want-1 (a failed pthread_create just leaves the pool smaller)
    grow_top, grow_body, grow_ok, grow_done = (run_fn.append_basic_block(s) for s in ("grow", "grow_body",
                                                                                       "grow_ok", "grow_done"))
    b.branch(grow_top)
    b.position_at_end(grow_top)
    have = team_field(b, team, WORKERS)
    b.cbranch(b.icmp_signed("<", b.add(have, c(1)), want), grow_body, grow_done)
    b.position_at_end(grow_body)
    new_id = b.add(have, c(1))
    warg = b.inttoptr(b.or_(b.shl(new_id, c(32)), b.zext(gen_now, I64)), PTR)
    rc = b.call(pthread_create, [tid, null, wm, warg])
    b.cbranch(b.icmp_signed("==", rc, ll.Constant(I32, 0)), grow_ok, grow_done)
    b.position_at_end(grow_ok)
    if own_lifecycle:                   # joined by PREFIX_stop
        b.store(b.load(tid, typ=I64), b.gep(tids, [new_id], inbounds=True, source_etype=I64))
    else:
        b.call(pthread_detach, [b.load(tid, typ=I64)])
    b.store(new_id, _slot(b, team, WORKERS))
    b.branch(grow_top)
    b.position_at_end(grow_done)
    have = team_field(b, team, WORKERS)
    parts = b.select(b.icmp_signed("<", b.add(have, c(1)), want), b.add(have, c(1)), want)
    go, alone = run_fn.append_basic_block("go"), run_fn.append_basic_block("alone")
    b.cbranch(b.icmp_signed(">", parts, c(1)), go, alone)
    b.position_at_end(alone)
    _store_atomic(b, c(0), _slot(b, team, BUSY), "release")
    b.ret(ll.Constant(I32, 0))
    b.position_at_end(go)
    if claim_lines:
        memset = _declare(module, "llvm.memset.p0.i64", VOID, [PTR, ll.IntType(8), I64, ll.IntType(1)])
        b.call(memset, [line_slot(b, team, 0, 0), ll.Constant(ll.IntType(8), 0), c(8 * LINE_SLOTS * claim_lines),
                        ll.Constant(ll.IntType(1), 0)])
    for k, v in ((PARTS, parts), (FN, b.ptrtoint(fn_arg, I64)), (ARGS, b.ptrtoint(args, I64)), (N, n),
                 (ARENA, b.ptrtoint(arena, I64)), (FIRST, first)):
        b.store(v, _slot(b, team, k))
    if claim_lines:     # open the job only now: a stale worker that sees CLOSED == 0 sees these fields too
        _store_atomic(b, c(0), _slot(b, team, CLOSED), "seq_cst")
    b.atomic_rmw("add", _slot(b, team, GEN), ll.Constant(I32, 1), "seq_cst")
    sleepers = b.load_atomic(_slot(b, team, SLEEPERS), "seq_cst", 8, typ=I64)
    wake, work = run_fn.append_basic_block("wake"), run_fn.append_basic_block("work")
    b.cbranch(b.icmp_signed(">", sleepers, c(0)), wake, work)
    b.position_at_end(wake)
    b.call(syscall, [c(SYS_FUTEX), _slot(b, team, GEN), c(FUTEX_WAKE_PRIVATE), c(MAX_THREADS)])
    b.branch(work)
    b.position_at_end(work)
    b.call(indirect_callee(b.inttoptr(b.ptrtoint(fn_arg, I64), PTR), team_fn_ty), [team, c(0)])
    if claim_lines:     # worker 0 saw every piece done; close the job and wait for workers still inside it
        _store_atomic(b, c(1), _slot(b, team, CLOSED), "seq_cst")
        spin_until(b, run_fn, module, _slot(b, team, INSIDE), lambda v: b.icmp_unsigned("==", v, c(0)), "inside")
    # the team entry ends with every worker past its last barrier: the job fields are free again
    _store_atomic(b, c(0), _slot(b, team, BUSY), "release")
    b.ret(ll.Constant(I32, 1))
    if own_lifecycle:
        _define_lifecycle(module, prefix, team_global, tids, syscall)
    return run_fn


def _define_lifecycle(module, prefix, team, tids, syscall):
    """PREFIX_stop (a destructor: stop and join the workers) and PREFIX_forked (atfork child handler:
    forget the workers, which do not exist in the child), registered by the constructor PREFIX_init."""
    c = lambda v: ll.Constant(I64, v)
    null = ll.Constant(PTR, None)
    stop = ll.Function(module, ll.FunctionType(VOID, []), name=f"{prefix}_stop")
    stop.linkage = "internal"
    stop.attributes.add("nounwind")
    b = ll.IRBuilder(stop.append_basic_block("entry"))
    got = b.cmpxchg(_slot(b, team, BUSY), c(0), c(1), "acquire", "monotonic")
    mine, leave = stop.append_basic_block("mine"), stop.append_basic_block("leave")
    b.cbranch(b.extract_value(got, 1), mine, leave)
    b.position_at_end(leave)            # a call is running (or no pool): leave the workers alone
    b.ret_void()
    b.position_at_end(mine)
    have = team_field(b, team, WORKERS)
    _store_atomic(b, c(1), _slot(b, team, STOP), "seq_cst")
    b.atomic_rmw("add", _slot(b, team, GEN), ll.Constant(I32, 1), "seq_cst")
    b.call(syscall, [c(SYS_FUTEX), _slot(b, team, GEN), c(FUTEX_WAKE_PRIVATE), c(MAX_THREADS)])
    pthread_join = _declare(module, "pthread_join", I32, [I64, PTR])
    count_loop(b, stop, c(1), b.add(have, c(1)),
               lambda k: b.call(pthread_join, [b.load(b.gep(tids, [k], inbounds=True, source_etype=I64), typ=I64), null]),
               "join")
    b.store(c(0), _slot(b, team, WORKERS))
    _store_atomic(b, c(0), _slot(b, team, STOP), "release")
    _store_atomic(b, c(0), _slot(b, team, BUSY), "release")
    b.ret_void()

    forked = ll.Function(module, ll.FunctionType(VOID, []), name=f"{prefix}_forked")
    forked.linkage = "internal"
    forked.attributes.add("nounwind")
    b = ll.IRBuilder(forked.append_basic_block("entry"))
    for k in (WORKERS, SLEEPERS, BUSY, ARRIVED, STOP, INSIDE):
        b.store(c(0), _slot(b, team, k))
    b.store(c(1), _slot(b, team, CLOSED))
    b.ret_void()

    init = ll.Function(module, ll.FunctionType(VOID, []), name=f"{prefix}_init")
    init.linkage = "internal"
    init.attributes.add("nounwind")
    b = ll.IRBuilder(init.append_basic_block("entry"))
    atfork = _declare(module, "pthread_atfork", I32, [PTR, PTR, PTR])
    b.call(atfork, [null, null, forked])
    b.ret_void()
    _add_structor(module, "llvm.global_ctors", init)
    _add_structor(module, "llvm.global_dtors", stop)


def _add_structor(module, symbol, fn, priority=65535):
    """Append fn to llvm.global_ctors / llvm.global_dtors (module with one entry each)."""
    entry_ty = ll.LiteralStructType([I32, PTR, PTR])
    arr_ty = ll.ArrayType(entry_ty, 1)
    gv = ll.GlobalVariable(module, arr_ty, name=symbol)
    gv.linkage = "appending"
    gv.initializer = ll.Constant(arr_ty, [ll.Constant(entry_ty, [ll.Constant(I32, priority), fn,
                                                                  ll.Constant(PTR, None)])])


class _IndirectCallee(ll.CastInstr):
    """A cast to `ptr` that IRBuilder.call accepts as a callee: llvmlite (opaque pointers) reads the
    callee's function type from the value, which a plain `ptr` value does not carry."""

    @property
    def function_type(self):
        return self._callee_type


def indirect_callee(value, fnty):
    """`value` (a cast instruction yielding ptr) marked as a callee of type `fnty`."""
    value.__class__ = _IndirectCallee
    value._callee_type = fnty
    return value


RUN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64)
RUN_TYPE = ll.FunctionType(I32, [PTR, PTR, I64, PTR, I64, I64])     # PREFIX_run, as IR
_process_pool = None
_process_pool_lock = threading.Lock()
# the JIT runtime's claim pool (process_claim_pool): enough work-item lines for any team entry that
# codegen's claim variant builds up to this many split nodes; a graph needing more runs without a team
PROCESS_CLAIM_LINES = 64
_process_claim_pool = None


def process_pool():
    """The JIT runtime's pool: one per process, compiled once, never freed (its workers live in its code).
    Returns the ctypes `run` function."""
    global _process_pool
    with _process_pool_lock:
        if _process_pool is None:
            from .jit import JitModule
            module = ll.Module(name="gcpool")
            define_pool(module)
            jit = JitModule(str(module))
            _process_pool = (jit, RUN(jit.address("gcpool_run")))
        return _process_pool[1]


def process_claim_pool() -> int:
    """The address of the JIT runtime's claim pool `gcclaim_run` (define_pool with PROCESS_CLAIM_LINES
    claim lines): one per process, compiled once, never freed, shared by every runtime module that calls
    it through a pointer (export.JIT_POOL), so no module's workers outlive its code."""
    global _process_claim_pool
    with _process_pool_lock:
        if _process_claim_pool is None:
            from .jit import JitModule
            module = ll.Module(name="gcclaim")
            define_pool(module, prefix="gcclaim", claim_lines=PROCESS_CLAIM_LINES)
            jit = JitModule(str(module))
            _process_claim_pool = (jit, jit.address("gcclaim_run"))
        return _process_claim_pool[1]
