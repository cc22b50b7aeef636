"""Learning-rate schedules with Keras 3 semantics: `schedule(step) -> float`, step = the number of
optimizer steps already taken (Keras' `optimizer.iterations`: 0 on the first batch).

The training graph reads its learning rate from the input `ir.training.LR`, so the training loop feeds
`schedule(step)` every call and a schedule never recompiles anything."""
from __future__ import annotations

import math

from ..errors import GraphcnnError


def _number(owner: str, what: str, value, positive: bool = False, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise GraphcnnError(f"{owner}: {what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise GraphcnnError(f"{owner}: {what} must be finite, got {v!r}")
    if positive and (v < 0 or (v == 0 and not allow_zero)):
        raise GraphcnnError(f"{owner}: {what} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return v


def _int(owner: str, what: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise GraphcnnError(f"{owner}: {what} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise GraphcnnError(f"{owner}: {what} must be >= {minimum}, got {value!r}")
    return int(value)


def _step(owner: str, step) -> float:
    """The step as a float; a negative or non-finite step is refused."""
    v = _number(owner, "step", step)
    if v < 0:
        raise GraphcnnError(f"{owner}: step must be >= 0, got {step!r}")
    return v


class LearningRateSchedule:
    """Base class: `__call__(step) -> float`, `get_config()`, `from_config(config)`."""

    def __call__(self, step) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict):
        """A schedule from `get_config()`'s dict."""
        if not isinstance(config, dict):
            raise GraphcnnError(f"{cls.__name__}.from_config: expected a dict, got {type(config).__name__}")
        try:
            return cls(**config)
        except TypeError as e:       # an unknown or missing argument
            raise GraphcnnError(f"{cls.__name__}.from_config: {e}") from None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()


class ExponentialDecay(LearningRateSchedule):
    """initial_learning_rate * decay_rate ** (step / decay_steps); staircase: the exponent is floored."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name="ExponentialDecay"):
        owner = type(self).__name__
        self.initial_learning_rate = _number(owner, "initial_learning_rate", initial_learning_rate)
        self.decay_steps = _number(owner, "decay_steps", decay_steps, positive=True, allow_zero=False)
        self.decay_rate = _number(owner, "decay_rate", decay_rate)
        if not isinstance(staircase, bool):
            raise GraphcnnError(f"{owner}: staircase must be True or False, got {staircase!r}")
        self.staircase = staircase
        self.name = name

    def __call__(self, step) -> float:
        p = _step(type(self).__name__, step) / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        try:
            return self.initial_learning_rate * self.decay_rate ** p
        except OverflowError:          # the optimizer refuses the non-finite rate with the step in the message
            return math.copysign(math.inf, self.initial_learning_rate)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase, "name": self.name}


class CosineDecay(LearningRateSchedule):
    """Keras 3 CosineDecay with optional linear warmup: for step < warmup_steps the rate goes linearly from
    initial_learning_rate to warmup_target; then (from warmup_target, or initial_learning_rate without
    warmup) it follows ((1 - alpha) * 0.5 * (1 + cos(pi * s / decay_steps)) + alpha) with s the steps
    since the warmup, held at its end value after decay_steps."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay", warmup_target=None,
                 warmup_steps=0):
        owner = type(self).__name__
        self.initial_learning_rate = _number(owner, "initial_learning_rate", initial_learning_rate)
        self.decay_steps = _number(owner, "decay_steps", decay_steps, positive=True, allow_zero=False)
        self.alpha = _number(owner, "alpha", alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise GraphcnnError(f"{owner}: alpha must be in [0, 1], got {alpha!r}")
        self.warmup_target = None if warmup_target is None else _number(owner, "warmup_target", warmup_target)
        self.warmup_steps = _int(owner, "warmup_steps", warmup_steps, 0)
        self.name = name

    def _decayed(self, step: float, start: float) -> float:
        fraction = step / self.decay_steps
        return start * ((1 - self.alpha) * 0.5 * (1.0 + math.cos(math.pi * fraction)) + self.alpha)

    def __call__(self, step) -> float:
        s = _step(type(self).__name__, step)
        if self.warmup_target is None:
            return self._decayed(min(s, self.decay_steps), self.initial_learning_rate)
        s = min(s, self.decay_steps + self.warmup_steps)
        if s < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (s / self.warmup_steps) + self.initial_learning_rate
        return self._decayed(s - self.warmup_steps, self.warmup_target)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha, "name": self.name, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] for step <= boundaries[0], values[i] for boundaries[i-1] < step <= boundaries[i],
    values[-1] after the last boundary (Keras)."""

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        owner = type(self).__name__
        if not isinstance(boundaries, (list, tuple)) or not isinstance(values, (list, tuple)):
            raise GraphcnnError(f"{owner}: boundaries and values must be lists, got {boundaries!r} and {values!r}")
        if len(values) != len(boundaries) + 1:
            raise GraphcnnError(f"{owner}: values must have one more element than boundaries, got "
                                f"{len(values)} values for {len(boundaries)} boundaries")
        self.boundaries = [_number(owner, f"boundaries[{i}]", b) for i, b in enumerate(boundaries)]
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise GraphcnnError(f"{owner}: boundaries must be strictly increasing, got {list(boundaries)}")
        self.values = [_number(owner, f"values[{i}]", v) for i, v in enumerate(values)]
        self.name = name

    def __call__(self, step) -> float:
        s = _step(type(self).__name__, step)
        for boundary, value in zip(self.boundaries, self.values):
            if s <= boundary:
                return value
        return self.values[-1]

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values), "name": self.name}


SCHEDULES = {cls.__name__: cls for cls in (ExponentialDecay, CosineDecay, PiecewiseConstantDecay)}


def serialize(schedule: LearningRateSchedule) -> dict:
    """{"class_name": ..., "config": ...} (Keras' serialized form)."""
    if not isinstance(schedule, LearningRateSchedule):
        raise GraphcnnError(f"serialize: expected a LearningRateSchedule, got {schedule!r}")
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config: dict) -> LearningRateSchedule:
    """The schedule `serialize` described; unknown classes are refused."""
    if not isinstance(config, dict) or set(config) != {"class_name", "config"}:
        raise GraphcnnError(f"schedules.deserialize: expected {{'class_name': ..., 'config': {{...}}}}, got {config!r}")
    cls = SCHEDULES.get(config["class_name"])
    if cls is None:
        raise GraphcnnError(f"schedules.deserialize: unknown schedule {config['class_name']!r}; "
                            f"known: {', '.join(SCHEDULES)}")
    return cls.from_config(dict(config["config"]))


__all__ = ["LearningRateSchedule", "ExponentialDecay", "CosineDecay", "PiecewiseConstantDecay", "serialize",
           "deserialize"]
