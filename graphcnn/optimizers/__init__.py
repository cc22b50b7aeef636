"""Optimizers with Keras 3 names, arguments and update rules: SGD, Adam, AdamW, RMSprop.

An optimizer object only describes the update: the training graph does it. Wiring (what the training
loop does):

    tg = ir.training.make_training_graph(fwd, loss, optimizer=opt.ir_name, config=opt.ir_config())
    exe = gc.compile(tg, ...)
    exe(x=..., y=..., lr=np.float32(opt.learning_rate_at(int(exe.state["step"]))))   # every step

`ir_config()` leaves the rate to the graph input `ir.training.LR`, so a schedule never recompiles. Every
setting is validated once, when the optimizer is made, by the same function the IR uses for op attributes
(`ir.ops.optim.check_setting`): errors name the optimizer and the argument.

As in Keras 3, `weight_decay` is decoupled (w -= w * weight_decay * lr before the update; AdamW is Adam with
a default weight_decay of 0.004) and `clipnorm` clips each variable's gradient to that L2 norm. Weight decay
applies to every trainable weight (Keras' exclude_from_weight_decay is not supported)."""
from __future__ import annotations

import math

from ir.ops.optim import check_setting
from ir.types import IRError

from ..errors import GraphcnnError
from . import schedules
from .schedules import LearningRateSchedule


def _checked(owner: str, name: str, value, label: str | None = None):
    try:
        return check_setting(owner, name, value, label)
    except IRError as e:
        raise GraphcnnError(str(e)) from None


class Optimizer:
    """Base class. Subclasses set `ir_name` and `settings` (Keras argument -> IR setting name, default)."""
    ir_name = ""
    settings: dict = {}

    def __init__(self, learning_rate, weight_decay=None, clipnorm=None, name=None, **kwargs):
        owner = type(self).__name__
        known = set(self.settings) | {"learning_rate", "weight_decay", "clipnorm", "name"}
        unknown = set(kwargs) - set(self.settings)
        if unknown:
            raise GraphcnnError(f"{owner}: unknown argument(s) {sorted(unknown)}; "
                                f"supported: {', '.join(sorted(known))}")
        if isinstance(learning_rate, LearningRateSchedule):
            self.learning_rate = learning_rate
        else:
            self.learning_rate = _checked(owner, "lr", learning_rate, "learning_rate")
        self.weight_decay = None if weight_decay is None else _checked(owner, "weight_decay", weight_decay)
        self.clipnorm = None if clipnorm is None else _checked(owner, "clipnorm", clipnorm)
        for arg, default in self.settings.items():
            setattr(self, arg, _checked(owner, arg, kwargs.get(arg, default)))
        self.name = name or owner.lower()

    def learning_rate_at(self, step: int) -> float:
        """The learning rate for the step after `step` completed steps (Keras' optimizer.iterations):
        the fixed rate, or the schedule's value, checked finite and >= 0."""
        try:
            whole = not isinstance(step, bool) and int(step) == step
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise GraphcnnError(f"{type(self).__name__}.learning_rate_at: step must be an integer, got {step!r}")
        if step < 0:
            raise GraphcnnError(f"{type(self).__name__}.learning_rate_at: step must be >= 0, got {step!r}")
        if not isinstance(self.learning_rate, LearningRateSchedule):
            return self.learning_rate
        rate = float(self.learning_rate(int(step)))
        if not (math.isfinite(rate) and rate >= 0):     # a decay may end at exactly 0
            raise GraphcnnError(f"{type(self).__name__}: learning-rate schedule {self.learning_rate!r} gave "
                                f"{rate!r} at step {int(step)}; a learning rate must be finite and >= 0")
        return rate

    def ir_config(self) -> dict:
        """Settings for ir.training.make_training_graph(optimizer=self.ir_name, config=...): lr None (the
        graph input ir.training.LR), None weight_decay/clipnorm as 0 (off)."""
        cfg = {"lr": None, "weight_decay": self.weight_decay or 0.0, "clipnorm": self.clipnorm or 0.0}
        cfg.update({arg: getattr(self, arg) for arg in self.settings})
        return cfg

    def get_config(self) -> dict:
        """Keras-style config: name, learning_rate (a float or a serialized schedule) and every argument."""
        lr = self.learning_rate
        cfg = {"name": self.name,
               "learning_rate": schedules.serialize(lr) if isinstance(lr, LearningRateSchedule) else lr,
               "weight_decay": self.weight_decay, "clipnorm": self.clipnorm}
        cfg.update({arg: getattr(self, arg) for arg in self.settings})
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> "Optimizer":
        """The optimizer `get_config()` described (a serialized schedule is rebuilt)."""
        if not isinstance(config, dict):
            raise GraphcnnError(f"{cls.__name__}.from_config: expected a dict, got {type(config).__name__}")
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()


class SGD(Optimizer):
    """Keras SGD: velocity = momentum * velocity - lr * g; w += velocity (nesterov: w += momentum * velocity
    - lr * g); momentum 0: w -= lr * g."""
    ir_name = "sgd"
    settings = {"momentum": 0.0, "nesterov": False}

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None, clipnorm=None,
                 name=None, **kwargs):
        super().__init__(learning_rate, weight_decay, clipnorm, name, momentum=momentum, nesterov=nesterov,
                         **kwargs)


class Adam(Optimizer):
    """Keras 3 Adam (epsilon is Kingma and Ba's epsilon-hat: w -= alpha * m / (sqrt(v) + epsilon))."""
    ir_name = "adam"
    settings = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=None,
                 clipnorm=None, name=None, **kwargs):
        super().__init__(learning_rate, weight_decay, clipnorm, name, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, **kwargs)


class AdamW(Adam):
    """Keras 3 AdamW: Adam with decoupled weight decay (default 0.004)."""

    def __init__(self, learning_rate=1e-3, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 clipnorm=None, name=None, **kwargs):
        if weight_decay is None:
            raise GraphcnnError("AdamW: weight_decay must be a number (use Adam for no weight decay), got None")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay, clipnorm, name, **kwargs)


class RMSprop(Optimizer):
    """Keras 3 RMSprop (epsilon inside the square root; centered; plain momentum)."""
    ir_name = "rmsprop"
    settings = {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}

    def __init__(self, learning_rate=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, weight_decay=None,
                 clipnorm=None, name=None, **kwargs):
        super().__init__(learning_rate, weight_decay, clipnorm, name, rho=rho, momentum=momentum, epsilon=epsilon,
                         centered=centered, **kwargs)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get(identifier, learning_rate=None) -> Optimizer:
    """An optimizer from a name ('adam', 'sgd', 'adamw', 'rmsprop', any case: Keras defaults), a dict
    (Keras' {'class_name': 'Adam', 'config': {...}} or {'name': 'adam', <arguments>}, where 'lr' is accepted
    for 'learning_rate') or an Optimizer (returned as is). learning_rate, when given, overrides the rate.
    Anything else is a GraphcnnError."""
    choices = ", ".join(repr(k) for k in OPTIMIZERS)
    if isinstance(identifier, Optimizer):
        if learning_rate is None:
            return identifier
        return type(identifier).from_config(dict(identifier.get_config(), learning_rate=learning_rate))
    if isinstance(identifier, str):
        cls, config = OPTIMIZERS.get(identifier.lower()), {}
        if cls is None:
            raise GraphcnnError(f"unknown optimizer {identifier!r}; choose one of {choices}")
    elif isinstance(identifier, dict):
        if "class_name" in identifier:          # Keras' serialized form; config["name"] names the instance
            if set(identifier) - {"class_name", "config"}:
                raise GraphcnnError(f"optimizer dict with 'class_name' takes only 'config' besides, got {identifier!r}")
            name, config = identifier["class_name"], dict(identifier.get("config") or {})
        else:                                   # {'name': 'adam', ...}: name picks the optimizer
            config = dict(identifier)
            name = config.pop("name", None)
        cls = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
        if cls is None:
            raise GraphcnnError(f"unknown optimizer {name!r} in {identifier!r}; choose one of {choices}")
        if "lr" in config:
            if "learning_rate" in config:
                raise GraphcnnError(f"optimizer {name!r}: give 'learning_rate' or 'lr', not both")
            config["learning_rate"] = config.pop("lr")
    else:
        raise GraphcnnError(f"optimizer must be a name ({choices}), a dict or a graphcnn.optimizers.Optimizer, "
                            f"got {type(identifier).__name__} {identifier!r}")
    if learning_rate is not None:
        config["learning_rate"] = learning_rate
    if isinstance(config.get("learning_rate"), dict):
        config["learning_rate"] = schedules.deserialize(config["learning_rate"])
    return cls(**config)


__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "get", "schedules"]
