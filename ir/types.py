"""Value types: a dtype and a shape whose first dimension may be the dynamic batch (None)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


class IRError(ValueError):
    """A malformed graph, op, attribute, IR text or JSON. The message says where and what."""


DTYPES = {"f32": np.dtype(np.float32), "i32": np.dtype(np.int32), "f64": np.dtype(np.float64)}


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for name, d in DTYPES.items():
        if d == dt:
            return name
    raise IRError(f"unsupported dtype {dt}; graphcnn supports {', '.join(DTYPES)}")


@dataclass(frozen=True)
class TensorType:
    """Type of one value: dtype name ('f32') and shape; shape[0] is None for the dynamic batch."""
    shape: tuple
    dtype: str = "f32"

    def __post_init__(self):
        shape = tuple(None if d is None else int(d) for d in self.shape)
        if any(d is None for d in shape[1:]):
            raise IRError(f"only the first (batch) dimension may be dynamic, got shape {self.shape}")
        if any(d is not None and d < 0 for d in shape):
            raise IRError(f"negative dimension in shape {self.shape}")
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def batched(self) -> bool:
        """True when the first dimension is the dynamic batch."""
        return bool(self.shape) and self.shape[0] is None

    def concrete(self, batch: int) -> tuple:
        """The shape with the batch dimension filled in."""
        return tuple(batch if d is None else d for d in self.shape)

    def numel(self, batch: int = 1) -> int:
        return int(np.prod(self.concrete(batch), dtype=np.int64))

    def nbytes(self, batch: int = 1) -> int:
        return self.numel(batch) * DTYPES[self.dtype].itemsize

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join('?' if d is None else str(d) for d in self.shape)}]"

    _RE = re.compile(r"^\s*([a-z]\w*)\[([^\]]*)\]\s*$")

    @classmethod
    def parse(cls, text: str) -> "TensorType":
        """Parse 'f32[?,28,28,1]'."""
        m = cls._RE.match(text)
        if not m:
            raise IRError(f"bad type {text!r}; expected e.g. f32[?,28,28,1]")
        dims = [d.strip() for d in m.group(2).split(",") if d.strip()]
        try:
            shape = tuple(None if d == "?" else int(d) for d in dims)
        except ValueError:
            raise IRError(f"bad dimension in type {text!r}") from None
        return cls(shape, m.group(1))
