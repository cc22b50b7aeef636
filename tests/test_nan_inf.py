"""NaN and ±inf through every op family, fused (the inference pipeline) and unfused (the same pipeline
without fuse_bias_activation), forward and gradients, on both backends.

- Every output's NaN positions and infinities (with sign) agree across the four compilations.
- Forward NaN positions match the float64 reference (IEEE semantics: relu(NaN) = NaN, a NaN anywhere in a
  pooling window gives NaN, inf - inf = NaN ...).
- Fused and unfused results are bit-identical on each backend.
The NumPy checks run first; LLVM disagreements raise LlvmMismatch, so a report names which side is wrong."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphcnn as gc
from op_cases import FAMILIES, Packed, op_case
from ir.passes import PIPELINES
from test_differential import SETTINGS, STATS, LlvmMismatch

UNFUSED = [p for p in PIPELINES["inference"] if p != "fuse_bias_activation"]
VARIANTS = {("numpy", "fused"): ("numpy", "inference"), ("numpy", "unfused"): ("numpy", UNFUSED),
            ("llvm", "fused"): ("llvm", "inference"), ("llvm", "unfused"): ("llvm", UNFUSED)}

def plant_specials(rng):
    """Replace about one element in eight by NaN, +inf or -inf (probabilities: NaN only — both backends
    clip probabilities before normalizing them, Keras after, so an infinite 'probability' is finite
    here and NaN in Keras: a known, reported difference)."""
    def corrupt(a, kind):
        a = a.copy()
        flat = a.reshape(-1)
        hit = rng.random(flat.size) < 0.125
        specials = [np.nan] if kind == "prob" else [np.nan, np.inf, -np.inf]
        flat[hit] = rng.choice(np.array(specials, np.float32), int(hit.sum()))
        return a
    return corrupt


def _same_specials(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)) and \
        np.array_equal(np.where(np.isinf(a), a, 0), np.where(np.isinf(b), b, 0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nan_inf_agree_fused_unfused_and_across_backends(family):

    @settings(max_examples=2, **SETTINGS)
    @given(cases=st.lists(op_case((family,)), min_size=8, max_size=8), seed=st.integers(0, 2 ** 31))
    def check(cases, seed):
        pk = Packed(cases, name=f"nan_{family}")
        gg = pk.grad_graph()
        exes = {key: gc.compile(gg, backend=b, passes=p) for key, (b, p) in VARIANTS.items()}
        rng = np.random.default_rng(seed)
        llvm_problems = []
        for n in (1, 3):
            feeds = pk.feeds(rng, n, corrupt=plant_specials(rng))
            refs = pk.reference(feeds)
            outs = {key: exe(**{k: feeds[k] for k, _ in exe.inputs}) for key, exe in exes.items()}
            for i, ((fam, cfg), (y, *_)) in enumerate(zip(cases, refs)):
                where = f"case {i} {fam} {cfg} n={n}"
                # NumPy: forward NaN positions as the reference; fused == unfused bit for bit
                assert np.array_equal(np.isnan(outs["numpy", "fused"][i]), np.isnan(y)), \
                    f"{where}: numpy forward NaN positions differ from the float64 reference"
                for k in range(len(outs["numpy", "fused"])):
                    np.testing.assert_array_equal(outs["numpy", "fused"][k], outs["numpy", "unfused"][k],
                                                  err_msg=f"{where}: numpy fused != unfused, output {k}")
                for k in [i] + list(range(len(pk.outputs) + 1, len(outs["numpy", "fused"]))):
                    for mode in ("fused", "unfused"):
                        if not _same_specials(outs["llvm", mode][k], outs["numpy", mode][k]):
                            llvm_problems.append(f"{where}: llvm {mode} output {k}: NaN/inf positions differ "
                                                 f"from numpy")
                    if not np.array_equal(outs["llvm", "fused"][k], outs["llvm", "unfused"][k], equal_nan=True):
                        llvm_problems.append(f"{where}: llvm fused != unfused bit for bit, output {k}")
            STATS["nan/inf cases"] += len(cases)
        if llvm_problems:
            raise LlvmMismatch("\n".join(sorted(set(llvm_problems))[:10]))

    check()
