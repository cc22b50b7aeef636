"""Seeded data-augmentation ops: random_flip and random_translation (Keras's RandomFlip and
RandomTranslation), active in training only — `identity_in_inference`, so the inference pipeline's
drop_dropout pass removes them like dropout.

Randomness is per image and counter-based, so every backend and every thread split draws the same:
key = mix32(seed * 0x9E3779B9 + step) (the dropout key), and image i (its index in the whole batch) draws
h_k = mix32((2 * i + k + 1) ^ key) for stream k (0: flip / vertical shift, 1: horizontal shift), turned into
r_k = (h_k >> 8) * 2**-24, uniform in [0, 1) and exact in float32.

random_flip: image i is flipped when r_0 < 0.5 — along the width ("horizontal"), the height ("vertical")
or both ("horizontal_and_vertical": one draw flips both axes, as Keras does).

random_translation (float32 throughout, in this order, so both backends round identically):
shift_h = (lo_h + (hi_h - lo_h) * r_0) * H, shift_w likewise with r_1 and W; output pixel (y, x) samples
the input at (y - shift_h, x - shift_w) (positive factors move the image down / right). "bilinear": taps
floor(s) and floor(s) + 1 per axis with weights 1 - f and f (f = s - floor(s)), the four products
w = w_row * w_col summed in row-major tap order; "nearest": the one tap round-half-even(s). A tap whose
weight is 0 is skipped (an integer shift reproduces pixels exactly, and an inf/NaN neighbour does not
leak in through 0 * inf). Tap indices outside the image follow `fill_mode` (Keras's definitions):
reflect (d c b a | a b c d | d c b a), wrap (a b c d | a b c d), nearest (a a | a b c d | d d), constant
(every outside tap reads fill_value). The gradient is the exact adjoint (random_translation_grad:
scatter-add of w * dy over the valid taps in the same order), flip's gradient is the same flip.
"""
from __future__ import annotations

import math
import numbers

from ..types import IRError
from . import REQUIRED, Op, emit, register

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
INTERPOLATIONS = ("bilinear", "nearest")


def _check_image_batch(op: str, types) -> None:
    x = types[0]
    if x.dtype != "f32" or len(x.shape) != 4:
        raise IRError(f"{op}: expects a float32 image batch (N, H, W, C), got {x}")
    if len(types) > 1 and (types[1].shape != () or types[1].dtype != "f32"):
        raise IRError(f"{op}: step must be a float32 scalar, got {types[1]}")


def _seed(op: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise IRError(f"{op}: seed must be an int, got {seed!r}")
    return int(seed) & 0xFFFFFFFF


def factor_range(op: str, name: str, factor) -> tuple[float, float]:
    """Keras's factor rule: f -> (-|f|, |f|); (a, b) -> (min, max); every bound in [-1, 1]."""
    def bound(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -1.0 <= float(v) <= 1.0:
            raise IRError(f"{op}: {name} must be a number in [-1, 1] or a pair of them (a fraction of the "
                          f"image size), got {factor!r}")
        return float(v)
    if isinstance(factor, (tuple, list)):
        if len(factor) != 2:
            raise IRError(f"{op}: {name} must be a number or a (lower, upper) pair, got {factor!r}")
        lo, hi = sorted((bound(factor[0]), bound(factor[1])))
        return (lo, hi)
    f = abs(bound(factor))
    return (-f, f)


@register
class RandomFlip(Op):
    """x (N, H, W, C) -> x with each image flipped or not (the module docstring gives the draw)."""
    name = "random_flip"
    inputs = ("x", "step?")
    attrs = {"mode": "horizontal", "seed": 0}
    identity_in_inference = True

    def normalize(self, types, attrs):
        if attrs["mode"] not in FLIP_MODES:
            raise IRError(f"{self.name}: mode must be one of {', '.join(FLIP_MODES)}, got {attrs['mode']!r}")
        return {"mode": attrs["mode"], "seed": _seed(self.name, attrs["seed"])}

    def infer(self, types, attrs):
        _check_image_batch(self.name, types)
        return [types[0]]

    def grad(self, node, douts):
        # a flip is its own inverse: the same draw flips the gradient back
        return [emit("random_flip", douts[0], *node.inputs[1:], **node.attrs), None]

    def flops(self, node, batch):
        return 0


class TranslationBase(Op):
    inputs = ("x", "step?")
    attrs = {"height_factor": REQUIRED, "width_factor": REQUIRED, "fill_mode": "reflect",
             "interpolation": "bilinear", "seed": 0, "fill_value": 0.0}
    identity_in_inference = True

    def normalize(self, types, attrs):
        a = dict(attrs)
        a["height_factor"] = factor_range(self.name, "height_factor", a["height_factor"])
        a["width_factor"] = factor_range(self.name, "width_factor", a["width_factor"])
        if a["fill_mode"] not in FILL_MODES:
            raise IRError(f"{self.name}: fill_mode must be one of {', '.join(FILL_MODES)}, got "
                          f"{a['fill_mode']!r}")
        if a["interpolation"] not in INTERPOLATIONS:
            raise IRError(f"{self.name}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                          f"{a['interpolation']!r}")
        fv = a["fill_value"]
        if isinstance(fv, bool) or not isinstance(fv, numbers.Real) or not math.isfinite(fv):
            raise IRError(f"{self.name}: fill_value must be a finite number, got {fv!r}")
        a["fill_value"] = float(fv)
        a["seed"] = _seed(self.name, a["seed"])
        return a

    def infer(self, types, attrs):
        _check_image_batch(self.name, types)
        return [types[0]]

    def flops(self, node, batch):
        taps = 4 if node.attrs["interpolation"] == "bilinear" else 1
        return 2 * taps * node.outputs[0].type.numel(batch)


@register
class RandomTranslation(TranslationBase):
    """x (N, H, W, C) -> each image shifted by a random fraction of its size (the module docstring)."""
    name = "random_translation"

    def grad(self, node, douts):
        return [emit("random_translation_grad", douts[0], *node.inputs[1:], **node.attrs), None]


@register
class RandomTranslationGrad(TranslationBase):
    """dy -> dx, the adjoint of random_translation with the same attributes and step."""
    name = "random_translation_grad"
    differentiable = False
