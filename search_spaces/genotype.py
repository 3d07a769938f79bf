"""`Genotype`: an immutable, hashable point of a search space with a canonical string.

Canonical form: ``space@version|key=value|key=value`` with the keys in the order the space
declares them. A value is an int, a float, a name (``[A-Za-z_][A-Za-z0-9_.-]*``) or a tuple of
values written ``(a,b,c)``. So a DARTS cell reads, for example::

    darts@2|normal=((0,sep_conv_3x3,1,skip_connect),...)|reduce=(...)

The string round-trips (``Genotype.from_str(g.to_str()) == g``) and its SHA-1 prefix is the
architecture's id everywhere: store rows, file names, logs.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from .errors import GenotypeError

__all__ = ["Genotype", "Value", "format_value", "parse_value"]

Value = int | float | str | tuple["Value", ...]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)")
_HEADER = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)@(\d+)")


def format_value(value: Value) -> str:
    """Canonical text of one value; raises `GenotypeError` for types a genotype cannot hold."""
    if isinstance(value, bool):  # bool is an int subclass: keep the text unambiguous
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise GenotypeError(f"genotype values must be finite, got {value!r}")
        text = repr(value)
        return text if ("." in text or "e" in text) else text + ".0"
    if isinstance(value, str):
        if not _NAME.fullmatch(value):
            raise GenotypeError(f"genotype names must match {_NAME.pattern}, got {value!r}")
        return value
    if isinstance(value, tuple):
        return "(" + ",".join(format_value(v) for v in value) + ")"
    raise GenotypeError(f"genotype values are int, float, name or tuple; got {type(value).__name__}")


def _parse(text: str, pos: int) -> tuple[Value, int]:
    if pos >= len(text):
        raise GenotypeError(f"unexpected end of value in {text!r}")
    if text[pos] == "(":
        items: list[Value] = []
        pos += 1
        if pos < len(text) and text[pos] == ")":
            return (), pos + 1
        while True:
            item, pos = _parse(text, pos)
            items.append(item)
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] == ")":
                return tuple(items), pos + 1
            else:
                raise GenotypeError(f"expected ',' or ')' at position {pos} of {text!r}")
    number = _NUMBER.match(text, pos)
    if number and not _NAME.match(text, pos):
        token = number.group(0)
        is_float = any(c in token for c in ".eEn")
        return (float(token) if is_float else int(token)), number.end()
    name = _NAME.match(text, pos)
    if name:
        return name.group(0), name.end()
    raise GenotypeError(f"cannot read a value at position {pos} of {text!r}")


def parse_value(text: str) -> Value:
    """Inverse of `format_value`."""
    value, end = _parse(text, 0)
    if end != len(text):
        raise GenotypeError(f"trailing characters {text[end:]!r} in value {text!r}")
    return value


@dataclass(frozen=True)
class Genotype:
    """An architecture: the space it belongs to and its decisions, in declared order.

    Plain data, no torch: ``fields`` is a tuple of ``(key, value)`` pairs so the object is
    hashable and its equality is the equality of the canonical strings.
    """

    space: str
    version: int
    fields: tuple[tuple[str, Value], ...]

    def __getitem__(self, key: str) -> Value:
        for k, v in self.fields:
            if k == key:
                return v
        raise KeyError(f"genotype of {self.space!r} has no field {key!r}; fields: {list(self.keys())}")

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.fields)

    def as_dict(self) -> dict[str, Value]:
        return dict(self.fields)

    def replace(self, **changes: Value) -> Genotype:
        """A new genotype with some fields changed (unknown keys are an error)."""
        unknown = set(changes) - set(self.keys())
        if unknown:
            raise GenotypeError(f"unknown genotype fields {sorted(unknown)}; fields: {list(self.keys())}")
        return Genotype(self.space, self.version, tuple((k, changes.get(k, v)) for k, v in self.fields))

    def to_str(self) -> str:
        body = "|".join(f"{k}={format_value(v)}" for k, v in self.fields)
        return f"{self.space}@{self.version}" + (f"|{body}" if body else "")

    __str__ = to_str

    @property
    def id(self) -> str:
        """Stable 12-hex-digit id: the SHA-1 prefix of the canonical string."""
        return hashlib.sha1(self.to_str().encode()).hexdigest()[:12]

    @classmethod
    def from_str(cls, text: str) -> Genotype:
        """Parse the canonical string (syntax only; `SearchSpace.from_str` also validates)."""
        if not isinstance(text, str) or not text:
            raise GenotypeError(f"a genotype string looks like 'space@1|key=value|...', got {text!r}")
        head, *parts = text.strip().split("|")
        header = _HEADER.fullmatch(head)
        if not header:
            raise GenotypeError(f"genotype header must be 'space@version', got {head!r} in {text!r}")
        fields: list[tuple[str, Value]] = []
        for part in parts:
            key, sep, raw = part.partition("=")
            if not sep or not _NAME.fullmatch(key):
                raise GenotypeError(f"genotype field must be 'key=value', got {part!r} in {text!r}")
            if key in dict(fields):
                raise GenotypeError(f"genotype field {key!r} appears twice in {text!r}")
            fields.append((key, parse_value(raw)))
        return cls(header.group(1), int(header.group(2)), tuple(fields))
