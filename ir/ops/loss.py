"""Loss ops (scalar mean over the batch, Keras semantics) and their gradients."""
from __future__ import annotations

from ..types import IRError, TensorType
from . import Op, emit, register

SCALAR = TensorType(())


class LossBase(Op):
    """loss(pred, target) -> scalar. Gradient ops take (pred, target, dloss) -> dpred."""
    inputs = ("pred", "target")
    attrs = {"from_logits": False}

    def normalize(self, types, attrs):
        p, t = types
        if p.rank != 2:
            raise IRError(f"{self.name}: predictions must be 2-D (batch, classes), got {p}")
        self.check_target(p, t)
        return {"from_logits": bool(attrs["from_logits"])}

    def check_target(self, p, t):
        if t.shape != p.shape:
            raise IRError(f"{self.name}: targets {t} must have the predictions' shape {p}")

    def infer(self, types, attrs):
        return [SCALAR]

    def flops(self, node, batch):
        return 4 * node.inputs[0].type.numel(batch)

    def grad(self, node, douts):
        p, t = node.inputs
        return [emit(self.name + "_grad", p, t, douts[0], **node.attrs), None]


class LossGradBase(LossBase):
    inputs = ("pred", "target", "dloss")
    differentiable = False

    def normalize(self, types, attrs):
        if types[2].shape != ():
            raise IRError(f"{self.name}: dloss must be a scalar, got {types[2]}")
        return super().normalize(types[:2], attrs)

    def infer(self, types, attrs):
        return [types[0]]


class SparseTarget:
    def check_target(self, p, t):
        if t.rank != 1 or (t.shape[0] != p.shape[0]):
            raise IRError(f"{self.name}: labels must be 1-D (batch,) integer class ids, got {t} for {p}")


@register
class SparseCategoricalCrossentropy(SparseTarget, LossBase):
    name = "sparse_categorical_crossentropy"


@register
class SparseCategoricalCrossentropyGrad(SparseTarget, LossGradBase):
    name = "sparse_categorical_crossentropy_grad"


@register
class CategoricalCrossentropy(LossBase):
    name = "categorical_crossentropy"


@register
class CategoricalCrossentropyGrad(LossGradBase):
    name = "categorical_crossentropy_grad"


@register
class MSE(LossBase):
    name = "mse"
    attrs = {}

    def normalize(self, types, attrs):
        p, t = types
        if t.shape != p.shape:
            raise IRError(f"mse: targets {t} must have the predictions' shape {p}")
        return {}


@register
class MSEGrad(LossGradBase):
    name = "mse_grad"
    attrs = {}

    def normalize(self, types, attrs):
        if types[2].shape != () or types[0].shape != types[1].shape:
            raise IRError(f"mse_grad: bad operand types {[str(t) for t in types]}")
        return {}
