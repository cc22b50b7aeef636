"""Batch-coupling analysis (ir/passes/batch_coupling.py) and what the LLVM executable does with it:
a graph whose samples interact must give the same answer with 1 and 2 threads, exactly."""
import numpy as np
import pytest

import graphcnn as gc
from graphcnn import ops
from ir.ops import emit
from ir.passes import run_pipeline
from ir.passes.batch_coupling import coupling_nodes, is_per_sample, training_split_blockers
from ir.training import make_training_graph, split_training_step
from ir.types import IRError


def _centered(g, x):
    """x - sum over the batch of x: every sample's output depends on every other sample."""
    return ops.sub(x, emit("sum_to", x, shape=(1,) + tuple(x.shape[1:])))


def coupled_graphs():
    """name -> (graph builder, input shapes per sample). Each output is batched, so the old rule
    ('inputs and outputs batched') would have split them."""
    def gram(g):
        x, y = g.input("x", (None, 5)), g.input("y", (None, 3))
        return ops.matmul(x, ops.matmul(x, y, transpose_a=True))          # x (xᵀ y)

    def batch_center(g):
        x = g.input("x", (None, 4, 4, 2))
        w = g.const("w", np.linspace(-1, 1, 3 * 3 * 2 * 3, dtype=np.float32).reshape(3, 3, 2, 3))
        return ops.relu(_centered(g, ops.conv2d(x, w, padding="same")))

    def bias_grad_feedback(g):
        x = g.input("x", (None, 6))
        return ops.mul(x, emit("bias_add_grad", x))                        # x * sum_batch(x)

    return {"gram": gram, "batch_center": batch_center, "bias_grad_feedback": bias_grad_feedback}


def _feeds(g, rng, n):
    return {v.name: rng.standard_normal((n,) + tuple(v.shape[1:])).astype(np.float32) for v in g.inputs}


@pytest.mark.parametrize("name", sorted(coupled_graphs()))
def test_coupled_graph_is_thread_count_independent(name, rng):
    g = gc.Graph(name)
    g.output(coupled_graphs()[name](g))
    assert not is_per_sample(g)
    feeds = _feeds(g, rng, 9)
    one = gc.compile(g, backend="llvm", threads=1)
    two = gc.compile(g, backend="llvm", threads=2)
    assert not two.splittable and two.split_blockers
    ref = gc.compile(g, backend="numpy")(**feeds)
    a, b = one(**feeds), two(**feeds)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("threads", [2, 3])
def test_claimed_chunks_fill_every_row_of_every_output(rng, threads):
    """A split batch runs in chunks of at most thread_pool.CHUNK_IMAGES images claimed by the threads: every
    row of every output (two outputs, one of them u8) is written, in order, for batches below, at and
    around the chunk size, bit-identical to one thread; NaN rows stay where they were."""
    from backends.llvm import thread_pool
    g = gc.Graph("two_outputs")
    x = g.input("x", (None, 5, 3, 2))
    w = g.input("w", (3, 3, 2, 4))
    y = ops.relu(ops.conv2d(x, w, padding="same"))
    g.output(ops.flatten(y), emit("quantize", y, scale=0.05, zero_point=3, dtype="u8"))
    chunk = thread_pool.CHUNK_IMAGES
    w_value = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    one = gc.compile(g, backend="llvm", threads=1)
    many = gc.compile(g, backend="llvm", threads=threads)
    assert many.splittable
    for n in (2, 3, chunk - 1, chunk, chunk + 1, threads * chunk + 5, 97):
        xs = rng.standard_normal((n, 5, 3, 2)).astype(np.float32)
        xs[n // 2] = np.nan
        want, got = one(x=xs, w=w_value), many(x=xs, w=w_value)
        for a, b in zip(want, got):
            assert a.dtype == b.dtype and a.shape[0] == n
            np.testing.assert_array_equal(a, b, err_msg=f"batch {n}")
        assert np.isnan(got[0][n // 2]).all() and not np.isnan(np.delete(got[0], n // 2, axis=0)).any()


def test_per_sample_graph_still_splits_and_agrees(rng):
    g = gc.Graph("per_sample")
    x = g.input("x", (None, 6, 5, 2))
    w = g.input("w", (3, 3, 2, 4))          # an unbatched input is shared by every chunk
    y = ops.max_pool2d(ops.relu(ops.conv2d(x, w, padding="same")), 2, padding="same")
    g.output(ops.softmax(ops.flatten(y)))
    assert is_per_sample(g) and coupling_nodes(g) == []
    feeds = _feeds(g, rng, 7)
    feeds["w"] = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    two = gc.compile(g, backend="llvm", threads=2)
    assert two.splittable
    np.testing.assert_array_equal(gc.compile(g, backend="llvm", threads=1)(**feeds), two(**feeds))


def test_analysis_names_the_coupling_node():
    g = gc.Graph("gram")
    g.output(coupled_graphs()["gram"](g))
    (node, reason), = coupling_nodes(g)
    assert node.op == "matmul" and node.attrs["transpose_a"] and "combines samples" in reason


def test_dropping_the_batch_axis_counts_as_coupling_even_if_an_op_forgets(monkeypatch):
    """An op that reduces over the batch but does not override couples_batch is still caught."""
    from ir.ops import get_op
    g = gc.Graph("forgot")
    x = g.input("x", (None, 3))
    g.output(ops.mul(x, emit("sum_to", x, shape=(3,))))
    monkeypatch.setattr(type(get_op("sum_to")), "couples_batch", lambda self, node: False)
    (node, reason), = coupling_nodes(g)
    assert node.op == "sum_to" and "drops the batch axis" in reason


# -- training ---------------------------------------------------------------------------------------

def _training_graph(center: bool):
    g = gc.Graph("train_center" if center else "train_plain")
    x = g.input("x", (None, 5))
    t = g.input("t", (None, 3))
    w, b = g.param("w", (5, 3)), g.param("b", (3,))
    h = _centered(g, x) if center else x
    p = ops.dense(h, w, b)
    g.output(p, ops.mse(p, t))
    return make_training_graph(g, g.outputs[1].name, "sgd", {"lr": 0.1})


def _one_step(tg, threads, feeds):
    params = {"w": np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3), "b": np.full(3, 0.1, np.float32)}
    exe = gc.compile(tg, backend="llvm", params=params, passes="training", threads=threads)
    outs = exe(**feeds)
    return exe, outs, {k: exe.state[k].copy() for k in ("w", "b")}


def test_training_with_coupled_forward_runs_unsplit(rng):
    tg = _training_graph(center=True)
    blockers = training_split_blockers(tg)
    assert blockers and any("sum_to" in r for r in blockers)
    with pytest.raises(IRError, match="cannot be split"):
        split_training_step(tg)
    feeds = _feeds(tg, rng, 11)
    exe1, outs1, w1 = _one_step(tg, 1, feeds)
    exe2, outs2, w2 = _one_step(tg, 2, feeds)
    assert not exe2.split_training
    for a, b in zip(outs1, outs2):
        np.testing.assert_array_equal(a, b)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])


def test_training_with_per_sample_forward_is_split(rng):
    tg = _training_graph(center=False)
    assert training_split_blockers(tg) == []
    feeds = _feeds(tg, rng, 11)
    _, outs1, w1 = _one_step(tg, 1, feeds)
    exe2, outs2, w2 = _one_step(tg, 2, feeds)
    assert exe2.split_training
    # chunk means recombined with weights n_i / n: equal up to float32 rounding of the reordered sums
    np.testing.assert_allclose(outs2[1], outs1[1], rtol=1e-5)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6)


def _loss_graph(combine):
    g = gc.Graph("loss_combine")
    x, t = g.input("x", (None, 3)), g.input("t", (None, 3))
    w = g.param("w", (3, 3))
    loss = ops.mse(ops.dense(x, w), t)
    g.output(combine(g, loss))
    fwd = run_pipeline(g, "training_forward").graph
    return make_training_graph(fwd, fwd.outputs[0].name, "sgd", {"lr": 0.1})


def test_affine_functions_of_the_loss_may_split():
    half = _loss_graph(lambda g, loss: emit("scale", ops.add(loss, g.const("c", np.float32(2.0))), factor=0.5))
    assert training_split_blockers(half) == []


def test_nonlinear_functions_of_the_loss_may_not_split():
    squared = _loss_graph(lambda g, loss: ops.mul(loss, loss))
    assert any("batch mean" in r for r in training_split_blockers(squared))


def test_update_graph_without_batch_runs_unsplit():
    """A state-update graph with no batched input whose output is the updated weight: nothing to split
    (splitting used to crash looking for the update's output in the gradient half)."""
    g = gc.Graph("update_only")
    w, grad = g.param("w", (3,)), g.input("g", (3,))
    new_w = emit("sgd_update", w, grad, g.const("lr", np.float32(0.5)))
    g.set_update(w, new_w)
    g.output(new_w)
    blockers = training_split_blockers(g)
    assert any("no input carries the batch axis" in r for r in blockers)
    assert any("computed by the state update" in r for r in blockers)
    exe = gc.compile(g, backend="llvm", params={"w": np.ones(3, np.float32)}, passes="none", threads=2)
    np.testing.assert_array_equal(exe(g=np.array([2, 0, -2], np.float32)), [0, 1, 2])


def test_runtime_one_call_path_caps_threads_at_the_c_api_limit():
    """gc.compile(threads=N) with N above the C API's MAX_THREADS (64) still compiles and runs the one-call
    path with 64 (NAME_run_threads would refuse more); one thread needs no pool at all."""
    from backends.llvm import thread_pool
    g = gc.Graph("cap")
    x = g.input("x", (None, 4, 4, 1))
    g.output(ops.relu(ops.flatten(x)))
    many = gc.compile(g, backend="llvm", threads=100)
    assert many._main.api is not None and many._main.api.threads == thread_pool.MAX_THREADS
    one = gc.compile(g, backend="llvm", threads=1)
    assert one._main.api is not None and "_pool_run" not in one.llvm_ir
