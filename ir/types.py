"""Value types: a dtype and a shape whose first dimension may be the dynamic batch (None)."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np


class IRError(ValueError):
    """A malformed graph, op, attribute, IR text or JSON. The message says where and what."""


# -- names ------------------------------------------------------------------------------------------
# The one rule for graph and value names, checked by Graph (so the DSL, gc.ops, JSON and the text parser
# all agree): a str of 1..MAX_NAME_LEN characters, every one printable in the sense of str.isprintable()
# (no control, format, surrogate, private-use, unassigned or separator characters except the ASCII
# space), and no leading or trailing space. Names never reach generated code: backends derive
# identifiers from ascii_identifier() or index tables, and quote with a language's own literal syntax.
MAX_NAME_LEN = 256


def check_name(name, what: str = "value name") -> str:
    """`name` if it follows the naming rule above, else IRError saying what is wrong with it."""
    if not isinstance(name, str):
        raise IRError(f"{what} must be a str, got {type(name).__name__}")
    if not name:
        raise IRError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise IRError(f"{what} {name[:40]!r}... is {len(name)} characters long (at most {MAX_NAME_LEN})")
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        raise IRError(f"{what} {name!r} contains the non-printable character U+{ord(bad):04X} "
                      f"({unicodedata.category(bad)}); names must be printable text")
    if name != name.strip(" "):
        raise IRError(f"{what} {name!r} must not start or end with a space")
    return name


def name_key(name: str) -> str:
    """The form under which two names count as the same: NFKC, as Python compares identifiers
    ('ｘ' and 'x', 'relu７' and 'relu7' are one name). A graph refuses two names with one key."""
    return unicodedata.normalize("NFKC", name)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_IDENTIFIER_CHAR = re.compile(r"[^A-Za-z0-9_]")


def ascii_identifier(name: str, max_len: int = 64) -> str:
    """An ASCII identifier ([A-Za-z_][A-Za-z0-9_]*) for `name`, valid in Python, C, LLVM and as a file
    stem. A name that already is one (and fits max_len) is kept; any other is sanitized (other characters
    become '_', truncated) and gets '_' + 8 hex digits of the name's SHA-256, so two names that sanitize
    alike ('my-net' and 'my_net') still get distinct identifiers."""
    if _IDENTIFIER.fullmatch(name) and len(name) <= max_len:
        return name
    stem = _NOT_IDENTIFIER_CHAR.sub("_", name)[:max_len] or "_"
    if stem[0].isdigit():
        stem = "g" + stem          # not '_': C reserves file-scope names that start with one
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}_{digest}"


# i8/u8 hold quantized activations and weights, i32 the quantized biases (ir/ops/quant.py)
DTYPES = {"f32": np.dtype(np.float32), "i32": np.dtype(np.int32), "f64": np.dtype(np.float64),
          "i8": np.dtype(np.int8), "u8": np.dtype(np.uint8)}


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
