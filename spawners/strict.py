"""The one strict input path: JSON bodies and numbers written as text.

Every JSON body the portal reads (the portal service, the extension's REST API) goes
through :func:`loads_json`; a value some other layer has already parsed (JupyterHub parses
the REST API's ``user_options``) goes through :func:`check_json_value`, which enforces
everything that can still be seen once parsed. Every number a user writes as text (a form
field, a size id, a query argument) goes through :func:`parse_int`.

:func:`loads_json` refuses

- a body over the limit (:class:`~.errors.TooLarge`, HTTP 413), checked before parsing;
- bytes that are not UTF-8;
- a key repeated in one object, at any depth (``{"gpus": 1, "gpus": 8}``: which one would
  policy see, and which one the scheduler?);
- ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow to infinity (``1e400``);
- nesting deeper than :data:`MAX_DEPTH`, strings with lone surrogates (``"\\ud800"``).

:func:`parse_int` accepts only ASCII digits in canonical form: ``0`` or a non-zero digit
then digits. ``str.isdigit()`` is not a test for this: ``"٣"``, ``"³"`` and ``"①"`` pass it
(and ``int()`` accepts ``"٣"``, ``" 3"``, ``"+3"``, ``"0_3"``).

Errors are :class:`~.errors.RequestRefused` naming the field, with untrusted text cut short.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from .errors import RequestRefused, TooLarge

#: Largest JSON body read by default (a request is a few hundred bytes).
MAX_JSON_BYTES = 64 * 1024
#: Deepest nesting of arrays and objects (a request is two levels deep).
MAX_DEPTH = 16
#: Canonical non-negative integers in ASCII digits (``[0-9]`` never matches other digits).
_CANONICAL_INT = re.compile(r"(?:0|[1-9][0-9]*)\Z")
#: The most digits :func:`parse_int` reads before saying "too large" (bounds its work).
MAX_DIGITS = 18


def shorten(value: str, limit: int = 40) -> str:
    """An untrusted string cut to ``limit`` characters, for an error message."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


class _Refuse(Exception):
    """Raised inside the parser's hooks; turned into a RequestRefused by loads_json."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refuse(f"the key {shorten(key)!r} appears twice in one object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refuse(f"{name} is not a number the portal accepts")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refuse(f"the number {shorten(text)} is too large")
    return value


def loads_json(
    body: bytes | str | None,
    *,
    limit: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
    what: str = "the body",
    empty: Any = None,
) -> Any:
    """Parse a JSON body strictly, or raise :class:`RequestRefused` / :class:`TooLarge`.

    An empty body gives ``empty``.
    """
    if body is None or len(body) == 0:
        return empty
    if len(body) > limit:
        raise TooLarge(f"{what} is over {limit} bytes", log_message=f"{what}: {len(body)} bytes")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestRefused(f"{what} is not UTF-8 text") from None
    else:
        text = body
    try:
        value = json.loads(
            text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
        )
    except _Refuse as e:
        raise RequestRefused(f"{what}: {e}", field=None) from None
    except RecursionError:
        raise RequestRefused(f"{what} is nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        where = f" at character {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        raise RequestRefused(f"{what} is not valid JSON{where}") from None
    check_json_value(value, max_depth=max_depth, what=what)
    return value


def check_json_value(value: Any, *, max_depth: int = MAX_DEPTH, what: str = "the request") -> None:
    """Check an already-parsed JSON value as :func:`loads_json` would.

    Once a body is parsed into a dict, a repeated key cannot be seen any more: only the
    parser can refuse it. Everything else is checked here: non-string keys, non-finite
    numbers, lone surrogates, nesting depth, and types JSON does not have.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        where = path or what
        if isinstance(node, dict | list) and depth > max_depth:
            raise RequestRefused(f"{what} is nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise RequestRefused(f"{where}: keys must be strings")
                _check_text(k, where)
                stack.append((v, depth + 1, f"{path}.{shorten(k)}" if path else shorten(k)))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                stack.append((v, depth + 1, f"{path}[{i}]"))
        elif isinstance(node, str):
            _check_text(node, where)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise RequestRefused(f"{where}: NaN and Infinity are not numbers", field=path)
        elif node is None or isinstance(node, bool | int):
            pass
        else:
            raise RequestRefused(f"{where}: {type(node).__name__} is not a JSON value")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestRefused(f"{where}: text with a lone surrogate (\\ud800…)") from None


def parse_int(text: str | None, field: str, *, lo: int = 0, hi: int | None = None) -> int:
    """A whole number written in canonical ASCII digits, from ``lo`` to ``hi``.

    Refuses (naming ``field``) a sign, spaces, leading zeros, underscores, non-ASCII
    digits such as ``"٣"`` or ``"³"``, and anything out of bounds.
    """
    bounds = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
    if not isinstance(text, str) or not text:
        raise RequestRefused(f"{field} must be a whole number {bounds}", field=field)
    if len(text) > MAX_DIGITS or not _CANONICAL_INT.match(text):
        raise RequestRefused(
            f"{field} must be a whole number {bounds}, written with the digits 0-9 "
            f"(no sign, spaces or leading zeros), got {shorten(text, 20)!r}",
            field=field,
        )
    value = int(text)
    if value < lo or (hi is not None and value > hi):
        raise RequestRefused(f"{field} must be a whole number {bounds}, got {value}", field=field)
    return value


_CANONICAL_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,6})?\Z")


def parse_decimal(text: str | None, field: str, *, lo: float, hi: float) -> float:
    """A number such as ``2`` or ``0.25`` in ASCII digits, from ``lo`` to ``hi``.

    ``float()`` is not a test: it takes ``"nan"``, ``"inf"``, ``"1e9"``, ``" 2"`` and
    ``"٢"``. This takes digits, at most one point and six decimals.
    """
    if not isinstance(text, str) or not _CANONICAL_DECIMAL.match(text):
        shown = shorten(text, 20) if isinstance(text, str) else text
        raise RequestRefused(
            f"{field} must be a number from {lo:g} to {hi:g} written with the digits 0-9 "
            f"and at most one '.', got {shown!r}",
            field=field,
        )
    value = float(text)
    if not lo <= value <= hi:
        raise RequestRefused(f"{field} must be a number from {lo:g} to {hi:g}", field=field)
    return value


_REQUIRED: Any = object()


def json_number(
    data: dict[str, Any],
    key: str,
    where: str = "",
    *,
    lo: float,
    hi: float,
    default: Any = _REQUIRED,
    null: bool = False,
    error: type[Exception] = RequestRefused,
) -> Any:
    """``data[key]`` as a float from ``lo`` to ``hi``: a JSON number that is neither a
    bool nor NaN/Infinity. The field is named ``<where><key>`` in the error (``where`` is
    a path prefix such as ``"devices[2]."``); ``error`` is the caller's error class (one
    that takes the message). A missing key gives ``default`` (an error when there is
    none); ``null`` lets ``None`` through as ``None``."""
    name = f"{where}{key}"
    if key not in data and default is not _REQUIRED:
        return default
    v = data.get(key)
    if v is None and null:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise error(f"{name}: must be a finite number, got {shorten(str(v))!r}")
    if not lo <= v <= hi:
        raise error(f"{name}: must be between {lo:g} and {hi:g}, got {v!r}")
    return float(v)


def only_fields(
    data: dict[str, Any],
    allowed: set[str] | frozenset[str],
    where: str = "",
    *,
    error: type[Exception] = RequestRefused,
) -> None:
    """Refuse the first (sorted) key of ``data`` that is not in ``allowed``, naming it as
    ``<where><key>: unknown field``."""
    unknown = set(data) - set(allowed)
    if unknown:
        raise error(f"{where}{shorten(sorted(unknown)[0])}: unknown field")


#: Unicode categories free text may not hold: controls, format characters (bidi overrides
#: such as U+202E), surrogates, private use, unassigned, line and paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def control_character(text: str) -> str | None:
    """The first character of ``text`` that free text may not hold, or ``None``."""
    for ch in text:
        if unicodedata.category(ch) in _UNPRINTABLE:
            return ch
    return None


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control or format character written as an escape (``\\x1b``),
    for a terminal or a log. With ``keep_newlines``, ``\\n`` stays a line break."""
    out = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in _UNPRINTABLE:
            out.append(ascii(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def is_canonical_int(text: str) -> bool:
    """Whether ``text`` is a canonical ASCII whole number (for ids read back from tools)."""
    return isinstance(text, str) and len(text) <= MAX_DIGITS and bool(_CANONICAL_INT.match(text))


def is_canonical_decimal(text: str) -> bool:
    """Whether ``text`` is a number as :func:`parse_decimal` takes it (``2``, ``0.25``)."""
    return isinstance(text, str) and bool(_CANONICAL_DECIMAL.match(text))


__all__ = [
    "MAX_DEPTH",
    "MAX_JSON_BYTES",
    "check_json_value",
    "control_character",
    "is_canonical_decimal",
    "is_canonical_int",
    "json_number",
    "loads_json",
    "only_fields",
    "parse_decimal",
    "parse_int",
    "printable",
    "shorten",
]
