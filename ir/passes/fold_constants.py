"""Constant folding: evaluate cheap structural and arithmetic nodes whose inputs are all constants.

Only constants fold: params are state that changes between calls (training), and inputs are fed per
call. The IR knows nothing of backends, so the few foldable ops are evaluated here with NumPy in
float32, the same arithmetic the kernels do (so a folded graph computes bit-identical values)."""
from __future__ import annotations

import numpy as np

from ..graph import Graph, Node

# op -> f(input arrays, attrs) -> output array. Cheap ops only: folding is a compile-time cost.
FOLDERS = {
    "reshape": lambda a, attrs: a[0].reshape(attrs["shape"]),
    "flatten": lambda a, attrs: a[0].reshape(a[0].shape[0], int(np.prod(a[0].shape[1:]))),
    "transpose": lambda a, attrs: np.transpose(a[0], attrs["perm"]),
    "add": lambda a, attrs: np.add(a[0], a[1]),
    "sub": lambda a, attrs: np.subtract(a[0], a[1]),
    "div": lambda a, attrs: np.divide(a[0], a[1]),
    "mul": lambda a, attrs: np.multiply(a[0], a[1]),
    "bias_add": lambda a, attrs: np.add(a[0], a[1]),
    "neg": lambda a, attrs: np.negative(a[0]),
    # a Python float times a float32 array stays float32 (NumPy 2 weak scalars), as in the kernel
    "scale": lambda a, attrs: np.multiply(a[0], float(attrs["factor"])),
    # gamma / sqrt(var + epsilon) in float32 steps, as the batch_norm kernels (fold_batch_norm's weights)
    "batch_norm_scale": lambda a, attrs: np.divide(a[0], np.sqrt(np.add(a[1], np.float32(attrs["epsilon"])))),
}


def fold_constants(g: Graph) -> Graph:
    """Replace every node in FOLDERS whose inputs are all constants by a constant of the same name.

    Folding cascades (a node fed by folded nodes folds too). Nodes whose outputs are graph outputs
    or update sources are left as nodes, so results stay node outputs for the backends. Constants
    that nothing reads any more are dropped."""
    values = {name: arr for name, arr in g.consts.items()}   # const name -> array (grows as we fold)
    results = {v.name for v in g.result_values()}
    folded: dict[str, np.ndarray] = {}
    kept: list[Node] = []
    for n in g.nodes:
        fold = FOLDERS.get(n.op)
        if fold is None or not all(v.name in values for v in n.inputs) or n.outputs[0].name in results:
            kept.append(n)
            continue
        out = n.outputs[0]
        arr = np.asarray(fold([values[v.name] for v in n.inputs], n.attrs), dtype=out.type.np_dtype)
        if arr.shape != out.shape:     # a folder disagreeing with the op's shape rule is a bug here
            raise AssertionError(f"fold_constants: {n.op} -> %{out.name} gave shape {arr.shape}, "
                                 f"the op says {out.shape}")
        values[out.name] = folded[out.name] = np.ascontiguousarray(arr)
    if not folded:
        out = g.rebuild(g.nodes)
        out.pass_note = ""
        return out
    used = {v.name for n in kept for v in n.inputs} | results
    # a graph with only the leaves plus the new constants, then the remaining nodes on top of it
    base = g.rebuild([], outputs=[], updates={}, keep_leaves=used)
    for name, arr in folded.items():
        if name in used:
            base.const(name, arr)
    result = base.rebuild(kept, outputs=g.outputs, updates=g.updates)
    result.pass_note = f"(folded {len(folded)} nodes into constants)"
    return result
