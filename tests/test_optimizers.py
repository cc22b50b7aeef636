"""Optimizers: graphcnn.optimizers (Keras 3 arguments, one validation), learning-rate schedules, and the
update kernels of both backends against a float64 reference of Keras 3's update rules (and torch.optim when
it is installed). The learning rate is the training graph's input `lr`, fed every call."""
import math

import numpy as np
import pytest

import graphcnn as gc
import ir
from graphcnn import optimizers as O
from graphcnn.optimizers import schedules as S
from ir.training import LR, make_training_graph, optimizer_config, split_training_step

BACKENDS = ("numpy", "llvm")


# ---------------------------------------------------------------------------------------------------------
# float64 reference: Keras 3 BaseOptimizer.apply (clipnorm, decoupled weight decay) + update_step

def keras_step(kind, cfg, w, g, slots, lr, t):
    """One Keras 3 step in float64 on copies; returns (w, slots). t = iterations + 1."""
    w, g = w.astype(np.float64), g.astype(np.float64)
    slots = {k: v.astype(np.float64) for k, v in slots.items()}
    if cfg.get("clipnorm"):
        norm = math.sqrt(float(np.sum(g * g)))
        g = g * cfg["clipnorm"] / max(norm, cfg["clipnorm"])
    if cfg.get("weight_decay"):
        w = w - w * cfg["weight_decay"] * lr
    if kind == "sgd":
        mom = cfg.get("momentum", 0.0)
        if mom:
            slots["velocity"] = -g * lr + slots["velocity"] * mom
            w = w + (-g * lr + slots["velocity"] * mom if cfg.get("nesterov") else slots["velocity"])
        else:
            w = w - g * lr
    elif kind == "adam":
        b1, b2, eps = cfg.get("beta_1", 0.9), cfg.get("beta_2", 0.999), cfg.get("epsilon", 1e-7)
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        slots["m"] = slots["m"] + (g - slots["m"]) * (1 - b1)
        slots["v"] = slots["v"] + (g * g - slots["v"]) * (1 - b2)
        w = w - slots["m"] * alpha / (np.sqrt(slots["v"]) + eps)
    else:
        rho, mom, eps = cfg.get("rho", 0.9), cfg.get("momentum", 0.0), cfg.get("epsilon", 1e-7)
        slots["velocity"] = rho * slots["velocity"] + (1 - rho) * g * g
        if cfg.get("centered"):
            slots["average_gradient"] = rho * slots["average_gradient"] + (1 - rho) * g
            denominator = slots["velocity"] - slots["average_gradient"] ** 2 + eps
        else:
            denominator = slots["velocity"] + eps
        increment = lr * g / np.sqrt(denominator)
        if mom > 0:
            slots["momentum_buffer"] = mom * slots["momentum_buffer"] + increment
            w = w - slots["momentum_buffer"]
        else:
            w = w - increment
    return w, slots


CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.5, "weight_decay": 0.1, "clipnorm": 0.3}),
    ("adam", {}),
    ("adam", {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}),
    ("adam", {"weight_decay": 0.004}),                              # AdamW
    ("adam", {"weight_decay": 0.05, "clipnorm": 0.5}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9}),
    ("rmsprop", {"centered": True}),
    ("rmsprop", {"rho": 0.5, "momentum": 0.3, "centered": True, "clipnorm": 1.0, "weight_decay": 0.01}),
]


def update_graph(kind, cfg, shape):
    """w' = update(w, g, lr) as a one-node training graph: g and lr are inputs, w and slots params."""
    full = optimizer_config(kind, dict(cfg, lr=None))
    full.pop("lr")
    op = ir.training.OPTIMIZERS[kind][0]
    opdef = ir.ops.get_op(op)
    g = ir.Graph("upd")
    w = g.param("w", shape)
    grad = g.input("g", shape)
    lr = g.input(LR, ())
    scalars = [g.input("t", ())] if opdef.scalars else []
    slots = [g.param(f"w/{s}", shape) for s in opdef.slot_names(full)]
    outs = g.add_node(op, [w, grad, lr, *scalars, *slots], full)
    for target, new in zip([w, *slots], outs):
        g.set_update(target, new)
    g.output(grad)             # (an update's output is not a graph output: the update writes it in place)
    return g, opdef.slot_names(full)


def run_updates(kind, cfg, backend, w0, grads, lrs):
    shape = w0.shape
    g, slot_names = update_graph(kind, cfg, shape)
    exe = gc.compile(g, backend=backend, params={"w": w0.copy()}, passes="none")
    for step, (gr, lr) in enumerate(zip(grads, lrs), start=1):
        feed = {"g": gr, LR: np.float32(lr)}
        if kind == "adam":
            feed["t"] = np.float32(step)
        exe(**feed)
    return exe.state["w"], {s: exe.state[f"w/{s}"] for s in slot_names}


@pytest.mark.parametrize("size", [1, 7, 1003])
@pytest.mark.parametrize("kind,cfg", CASES, ids=[f"{k}-{'-'.join(c) or 'default'}" for k, c in CASES])
def test_update_kernels_match_keras_reference(kind, cfg, size):
    rng = np.random.default_rng(size)
    w0 = rng.standard_normal(size).astype(np.float32)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(4)]
    lrs = [0.05, 0.02, 0.01, 0.03]                       # a different rate every step: the lr input
    want_w, want = w0, {}
    _, names = update_graph(kind, cfg, (size,))
    want = {s: np.zeros(size) for s in names}
    for t, (gr, lr) in enumerate(zip(grads, lrs), start=1):
        want_w, want = keras_step(kind, cfg, want_w, gr, want, float(np.float32(lr)), t)
    got = {be: run_updates(kind, cfg, be, w0, grads, lrs) for be in BACKENDS}
    for be, (w, slots) in got.items():
        np.testing.assert_allclose(w, want_w, rtol=2e-5, atol=2e-6, err_msg=be)
        for s in names:
            np.testing.assert_allclose(slots[s], want[s], rtol=2e-5, atol=2e-6, err_msg=f"{be} {s}")
    (wn, sn), (wl, sl) = got["numpy"], got["llvm"]
    if kind == "sgd" and not cfg.get("clipnorm"):
        np.testing.assert_array_equal(wn, wl)               # same float32 operations in the same order
    else:
        np.testing.assert_allclose(wn, wl, rtol=1e-6, atol=1e-7)
    for s in names:
        np.testing.assert_allclose(sn[s], sl[s], rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # NaN and inf on purpose
@pytest.mark.parametrize("kind,cfg", [("sgd", {"clipnorm": 1.0}), ("adam", {"clipnorm": 1.0}),
                                      ("rmsprop", {"weight_decay": 0.1})])
def test_non_finite_gradients_give_the_same_result_in_both_backends(kind, cfg):
    w0 = np.linspace(-1, 1, 11).astype(np.float32)
    g = np.linspace(0.5, -0.5, 11).astype(np.float32)
    g[3], g[7] = np.nan, np.inf
    res = [run_updates(kind, cfg, be, w0, [g], [0.1])[0] for be in BACKENDS]
    np.testing.assert_array_equal(np.isnan(res[0]), np.isnan(res[1]))
    np.testing.assert_allclose(res[0], res[1], rtol=1e-6, atol=1e-7)
    assert np.isnan(res[0][3])


def test_clipnorm_clips_each_variable_to_the_norm():
    """Keras' per-variable clipping: a gradient of norm 10 becomes norm clipnorm, one of norm 0.5 stays."""
    for scale, want_norm in ((10.0, 2.0), (0.5, 0.5)):
        g = np.array([3.0, 4.0], np.float32) * np.float32(scale / 5.0)
        for be in BACKENDS:
            w, _ = run_updates("sgd", {"clipnorm": 2.0}, be, np.zeros(2, np.float32), [g], [1.0])
            assert abs(np.linalg.norm(w.astype(np.float64)) - want_norm) < 1e-6, be


def test_keras_rmsprop_docstring_example():
    """Keras' RMSprop docstring: var=10, loss=var^2/2, lr=0.1 -> 9.683772 after one step."""
    for be in BACKENDS:
        w, _ = run_updates("rmsprop", {}, be, np.array([10.0], np.float32), [np.array([10.0], np.float32)], [0.1])
        assert abs(float(w[0]) - 9.683772) < 1e-5, be


# ---------------------------------------------------------------------------------------------------------
# torch.optim (an optional extra): the same trajectory for the formulas both libraries share

def test_updates_match_torch_optim():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal(64).astype(np.float32)
    grads = [rng.standard_normal(64).astype(np.float32) for _ in range(5)]
    lr = 0.01
    cases = [("sgd", {"momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)),
             ("sgd", {"momentum": 0.9, "nesterov": True},
              lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
             ("adam", {}, lambda p: torch.optim.Adam(p, lr=lr, eps=1e-7)),
             ("adam", {"weight_decay": 0.004}, lambda p: torch.optim.AdamW(p, lr=lr, eps=1e-7, weight_decay=0.004)),
             # torch puts epsilon outside the square root: immaterial at 1e-10 against v ~ 0.1
             ("rmsprop", {"epsilon": 1e-10, "momentum": 0.5},
              lambda p: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-10, momentum=0.5))]
    for kind, cfg, make in cases:
        p = torch.nn.Parameter(torch.tensor(w0.astype(np.float64)))
        opt = make([p])
        for gr in grads:
            p.grad = torch.tensor(gr.astype(np.float64))
            opt.step()
        want = p.detach().numpy()
        for be in BACKENDS:
            got, _ = run_updates(kind, cfg, be, w0, grads, [lr] * len(grads))
            # Keras' Adam epsilon is epsilon-hat (not scaled by the bias correction): a 1e-7-sized difference
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{kind} {cfg} {be}")


# ---------------------------------------------------------------------------------------------------------
# the learning rate is a training-graph input

def tiny_forward():
    g = ir.Graph("tiny")
    x = g.input("x", (None, 6))
    y = g.input("y", (None,))
    w = g.param("w", (6, 3))
    b = g.param("b", (3,))
    logits = gc.ops.dense(x, w, b)
    g.output(logits, gc.ops.sparse_categorical_crossentropy(logits, y, from_logits=True))
    return g


def tiny_data(rng, n=8):
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.float32)


def compile_trainer(opt_name, config, backend, w0, **options):
    fwd = tiny_forward()
    tg = make_training_graph(fwd, fwd.outputs[1].name, opt_name, config)
    return tg, gc.compile(tg, backend=backend, params={"w": w0.copy(), "b": np.zeros(3, np.float32)},
                          passes="training", **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_schedule_feeds_the_lr_input_without_recompiling(backend):
    """One compiled step, a rate per call from the schedule; checked against a float64 NumPy reference of
    the whole step (dense + softmax cross-entropy gradients, then Keras SGD with momentum)."""
    rng = np.random.default_rng(5)
    w0 = (rng.standard_normal((6, 3)) * 0.5).astype(np.float32)
    opt = O.SGD(S.PiecewiseConstantDecay([1, 2], [0.5, 0.1, 0.0]), momentum=0.5)
    tg, exe = compile_trainer(opt.ir_name, opt.ir_config(), backend, w0)
    assert [v.name for v in tg.inputs] == ["x", "y", LR] and tg.value(LR).type.shape == ()
    x, y = tiny_data(rng)
    cfg = {"momentum": 0.5}
    w, b = w0.astype(np.float64), np.zeros(3)
    slots_w, slots_b = {"velocity": np.zeros_like(w)}, {"velocity": np.zeros_like(b)}
    for step in range(5):
        assert int(exe.state["step"]) == step
        lr = opt.learning_rate_at(step)
        before = exe.state["w"].copy()
        exe(x=x, y=y, lr=np.float32(lr))
        logits = x.astype(np.float64) @ w + b
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        d = (prob - np.eye(3)[y.astype(int)]) / len(x)
        w, slots_w = keras_step("sgd", cfg, w, x.T.astype(np.float64) @ d, slots_w, lr, step + 1)
        b, slots_b = keras_step("sgd", cfg, b, d.sum(0), slots_b, lr, step + 1)
        np.testing.assert_allclose(exe.state["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exe.state["w/velocity"], slots_w["velocity"], rtol=1e-5, atol=1e-6)
        assert not np.array_equal(before, exe.state["w"])        # lr 0 at steps 3, 4: momentum still moves w


@pytest.mark.parametrize("backend", BACKENDS)
def test_fed_rate_equals_the_same_constant_rate(backend):
    """config lr=None (input) fed 0.05 every step == config lr=0.05 (constant): bit-identical."""
    rng = np.random.default_rng(6)
    w0 = (rng.standard_normal((6, 3)) * 0.5).astype(np.float32)
    _, fed = compile_trainer("adam", {"lr": None, "weight_decay": 0.01}, backend, w0)
    tg, fixed = compile_trainer("adam", {"lr": 0.05, "weight_decay": 0.01}, backend, w0)
    assert LR not in [v.name for v in tg.inputs] and LR in tg.consts
    for _ in range(3):
        x, y = tiny_data(rng)
        fed(x=x, y=y, lr=np.float32(0.05))
        fixed(x=x, y=y)
    for k in fixed.state:
        np.testing.assert_array_equal(fed.state[k], fixed.state[k], err_msg=k)


def test_a_missing_lr_input_is_refused():
    w0 = np.zeros((6, 3), np.float32)
    _, exe = compile_trainer("sgd", {"lr": None}, "numpy", w0)
    x, y = tiny_data(np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"missing inputs \['lr'\]"):
        exe(x=x, y=y)


def test_old_string_api_keeps_a_fixed_rate():
    fwd = tiny_forward()
    tg = make_training_graph(fwd, fwd.outputs[1].name, "sgd", {"lr": 0.1})
    assert [v.name for v in tg.inputs] == ["x", "y"] and float(tg.consts[LR]) == np.float32(0.1)
    tg = make_training_graph(fwd, fwd.outputs[1].name, "adam")
    assert float(tg.consts[LR]) == np.float32(1e-3)


def test_threaded_llvm_training_reads_the_fed_rate():
    """With 2 threads the step is split (gradients | update): the update part gets the lr input too."""
    rng = np.random.default_rng(8)
    w0 = (rng.standard_normal((6, 3)) * 0.5).astype(np.float32)
    fwd = tiny_forward()
    tg = make_training_graph(fwd, fwd.outputs[1].name, "rmsprop", {"lr": None, "momentum": 0.5})
    grads_g, update_g = split_training_step(tg)
    assert LR in [v.name for v in update_g.inputs] and all(n.op != "rmsprop_update" for n in grads_g.nodes)
    results = []
    for threads in (1, 2):
        exe = gc.compile(tg, backend="llvm", params={"w": w0.copy(), "b": np.zeros(3, np.float32)},
                         passes="training", threads=threads)
        r = np.random.default_rng(9)
        for lr in (0.1, 0.01, 0.001):
            x, y = tiny_data(r)
            exe(x=x, y=y, lr=np.float32(lr))
        results.append(exe.state["w"].copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# one validation of optimizer settings

BAD_SETTINGS = [
    (O.SGD, {"momentum": -0.1}, r"SGD: momentum must be in \[0.0, 1.0\), got -0.1"),
    (O.SGD, {"momentum": 1.0}, r"SGD: momentum must be in \[0.0, 1.0\), got 1.0"),
    (O.SGD, {"learning_rate": float("inf")}, "SGD: learning_rate must be finite, got inf"),
    (O.SGD, {"learning_rate": 0.0}, r"SGD: learning_rate must be in \(0.0, inf\)"),
    (O.SGD, {"nesterov": "yes"}, "SGD: nesterov must be True or False"),
    (O.Adam, {"beta_1": 1.0}, r"Adam: beta_1 must be in \[0.0, 1.0\), got 1.0"),
    (O.Adam, {"beta_2": -0.5}, r"Adam: beta_2 must be in \[0.0, 1.0\)"),
    (O.Adam, {"epsilon": float("nan")}, "Adam: epsilon must be finite, got nan"),
    (O.Adam, {"epsilon": 0.0}, r"Adam: epsilon must be in \(0.0, inf\)"),
    (O.Adam, {"learning_rate": "fast"}, "Adam: learning_rate must be a number, got 'fast'"),
    (O.AdamW, {"weight_decay": -1.0}, r"AdamW: weight_decay must be in \[0.0, inf\)"),
    (O.AdamW, {"weight_decay": None}, "AdamW: weight_decay must be a number"),
    (O.RMSprop, {"rho": 1.0}, r"RMSprop: rho must be in \[0.0, 1.0\)"),
    (O.RMSprop, {"clipnorm": float("-inf")}, "RMSprop: clipnorm must be finite"),
    (O.RMSprop, {"clipvalue": 1.0}, r"RMSprop: unknown argument\(s\) \['clipvalue'\]"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_optimizer_and_argument(cls, kwargs, message):
    with pytest.raises(gc.GraphcnnError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("optimizer,config,message", [
    ("sgd", {"momentum": -0.1}, r"sgd: momentum must be in \[0.0, 1.0\)"),
    ("adam", {"beta_1": 1.0}, r"adam: beta_1 must be in \[0.0, 1.0\)"),
    ("sgd", {"lr": float("inf")}, "sgd: lr must be finite"),
    ("adam", {"epsilon": float("nan")}, "adam: epsilon must be finite"),
    ("rmsprop", {"lr": -1.0}, r"rmsprop: lr must be in \(0.0, inf\)"),
    ("adam", {"momentum": 0.9}, r"adam: unknown setting\(s\) \['momentum'\]"),
])
def test_the_ir_refuses_bad_settings_before_any_backend(optimizer, config, message):
    """One validation for both backends: make_training_graph (and the op itself) refuse, the same way."""
    fwd = tiny_forward()
    with pytest.raises(ir.IRError, match=message):
        make_training_graph(fwd, fwd.outputs[1].name, optimizer, config)


def test_update_ops_validate_their_attributes():
    g = ir.Graph("u")
    w, gr, lr = g.param("w", (3,)), g.input("g", (3,)), g.input("lr", ())
    with pytest.raises(ir.IRError, match=r"sgd_update: momentum must be in \[0.0, 1.0\), got -0.5"):
        g.add_node("sgd_update", [w, gr, lr], {"momentum": -0.5})
    with pytest.raises(ir.IRError, match=r"sgd_update: with these settings expects operands \(w, g, lr, velocity\)"):
        g.add_node("sgd_update", [w, gr, lr], {"momentum": 0.5})
    with pytest.raises(ir.IRError, match="sgd_update: lr must be a scalar"):
        g.add_node("sgd_update", [w, gr, gr], {})


def test_schedule_values_are_checked_when_used():
    opt = O.SGD(S.ExponentialDecay(0.1, 10, 1e300))
    assert opt.learning_rate_at(0) == 0.1
    with pytest.raises(gc.GraphcnnError, match="must be finite and >= 0"):
        opt.learning_rate_at(10_000)
    with pytest.raises(gc.GraphcnnError, match="step must be an integer"):
        opt.learning_rate_at(1.5)
    with pytest.raises(gc.GraphcnnError, match="step must be >= 0"):
        opt.learning_rate_at(-1)


# ---------------------------------------------------------------------------------------------------------
# get / config

def test_get_accepts_names_dicts_and_optimizers():
    assert O.get("adam") == O.Adam() and O.get("SGD") == O.SGD() and O.get("rmsprop") == O.RMSprop()
    w = O.get("adamw")
    assert isinstance(w, O.AdamW) and w.weight_decay == 0.004 and w.ir_name == "adam"
    assert O.get("adam", learning_rate=0.01).learning_rate == 0.01
    assert O.get({"name": "sgd", "lr": 0.1, "momentum": 0.9}) == O.SGD(0.1, momentum=0.9)
    keras_form = {"class_name": "RMSprop", "config": {"learning_rate": 0.01, "centered": True}}
    assert O.get(keras_form) == O.RMSprop(0.01, centered=True)
    opt = O.Adam(0.02)
    assert O.get(opt) is opt
    assert O.get(opt, learning_rate=0.5).learning_rate == 0.5 and opt.learning_rate == 0.02


@pytest.mark.parametrize("identifier,message", [
    (42, "optimizer must be a name"), (None, "optimizer must be a name"), (["adam"], "optimizer must be a name"),
    ("adagrad", "unknown optimizer 'adagrad'"), ({"name": "nadam"}, "unknown optimizer 'nadam'"),
    ({"lr": 0.1}, "unknown optimizer None"), ({"name": "sgd", "lr": 0.1, "learning_rate": 0.2}, "not both"),
    ({"name": "adam", "beta_1": 2.0}, r"Adam: beta_1 must be in \[0.0, 1.0\)"),
])
def test_get_refuses_anything_else(identifier, message):
    with pytest.raises(gc.GraphcnnError, match=message):
        O.get(identifier)


@pytest.mark.parametrize("opt", [O.SGD(0.1, momentum=0.9, nesterov=True, clipnorm=1.0),
                                 O.Adam(S.CosineDecay(0.01, 100, alpha=0.1, warmup_target=0.02, warmup_steps=5)),
                                 O.AdamW(weight_decay=0.01), O.RMSprop(S.ExponentialDecay(0.1, 10, 0.5, True))])
def test_config_round_trip(opt):
    again = type(opt).from_config(opt.get_config())
    assert again == opt and again.ir_config() == opt.ir_config()
    assert all(again.learning_rate_at(s) == opt.learning_rate_at(s) for s in (0, 3, 50, 500))


def test_ir_config_feeds_make_training_graph():
    for opt in (O.SGD(momentum=0.9), O.Adam(), O.AdamW(), O.RMSprop(momentum=0.5, centered=True)):
        fwd = tiny_forward()
        tg = make_training_graph(fwd, fwd.outputs[1].name, optimizer=opt.ir_name, config=opt.ir_config())
        assert LR in [v.name for v in tg.inputs]
        slots = sorted(p.name for p in tg.params if p.name.startswith("w/"))
        assert slots == sorted(f"w/{s}" for s in ir.training.optimizer_slots(opt.ir_name, opt.ir_config()))


# ---------------------------------------------------------------------------------------------------------
# schedules: Keras 3's formulas, written out independently

def test_exponential_decay():
    s = S.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert [s(k) for k in (0, 5, 10, 25)] == pytest.approx([0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.1 * 0.5 ** 2.5])
    st = S.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
    assert [st(k) for k in (0, 9, 10, 19, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_cosine_decay_and_warmup():
    s = S.CosineDecay(1.0, decay_steps=100, alpha=0.2)
    for k in (0, 1, 37, 50, 100, 150):
        c = min(k, 100) / 100
        assert s(k) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * c)) + 0.2)
    w = S.CosineDecay(0.0, decay_steps=10, warmup_target=1.0, warmup_steps=4)
    assert [w(k) for k in (0, 1, 2, 3)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert w(4) == pytest.approx(1.0) and w(9) == pytest.approx(0.5) and w(14) == pytest.approx(0.0, abs=1e-12)
    assert w(1000) == pytest.approx(0.0, abs=1e-12)


def test_piecewise_constant_decay_boundaries_are_inclusive():
    s = S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    assert [s(k) for k in (0, 10, 11, 20, 21, 10_000)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


@pytest.mark.parametrize("make,message", [
    (lambda: S.ExponentialDecay(0.1, 0, 0.5), "decay_steps must be > 0"),
    (lambda: S.ExponentialDecay(float("nan"), 10, 0.5), "initial_learning_rate must be finite"),
    (lambda: S.ExponentialDecay(0.1, 10, 0.5, staircase=1), "staircase must be True or False"),
    (lambda: S.CosineDecay(0.1, 10, alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda: S.CosineDecay(0.1, 10, warmup_steps=-1), "warmup_steps must be >= 0"),
    (lambda: S.PiecewiseConstantDecay([1, 2], [0.1]), "one more element"),
    (lambda: S.PiecewiseConstantDecay([2, 1], [0.1, 0.2, 0.3]), "strictly increasing"),
    (lambda: S.deserialize({"class_name": "os.system", "config": {}}), "unknown schedule 'os.system'"),
    (lambda: S.ExponentialDecay.from_config({"initial_learning_rate": 0.1}), "from_config"),
    (lambda: S.ExponentialDecay(0.1, 10, 0.5)(-1), "step must be >= 0"),
])
def test_bad_schedules_are_refused(make, message):
    with pytest.raises(gc.GraphcnnError, match=message):
        make()
