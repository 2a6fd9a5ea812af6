"""Typed configuration from TOML or JSON tables: the one engine behind both config files.

The snapshotter's TOML (``pynydus.config``) and nydusd's JSON or TOML
(``pynydus.daemon.config``) are both described as frozen dataclasses whose field names are
the file's keys; nested dataclasses are sub-tables. Reading a table takes three steps:

1. *Collect*: walk the table guided by the schema and record every known key under its
   dotted name with where it came from; an unknown key or table becomes a warning with a
   suggestion (an exact name elsewhere in the schema first, else a close spelling).
2. *Convert*: type-check each recorded value and convert it (durations to seconds,
   enumerations to ``StrEnum`` members, lists to tuples, lists of tables to tuples of
   dataclasses). A mismatch raises ``ConfigError`` naming the origin and the dotted key:
   ``config /etc/x.toml: snapshot.sync_remove: expected a boolean, got string "yes"``.
3. *Refuse*: a field marked ``unsupported`` whose value differs from its default raises
   ``ConfigError`` naming the key: ``...: experimental.enable_stargz: true is not supported
   by pynydus yet (stargz images); remove it or set it to false``. Defaults stay accepted, so
   files that spell them out still load.

A key that is present takes its value (``false``, ``0`` and ``""`` included); defaults
apply only to absent keys. A JSON ``null`` counts as absent, as serde's ``Option`` does.

Field metadata (built with the helpers below): durations, memory sizes, integer bounds,
case-insensitive choices, enumeration aliases, raw tables (kept as dicts, for a union the
caller dispatches on, like nydusd's ``backend.config``), and ``unsupported`` reasons.
Everything here is pure: tables in, values out.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pynydus.errors import ConfigError

__all__ = [
    "Recorded",
    "all_leaves",
    "build",
    "choice",
    "collect",
    "count",
    "describe",
    "duration",
    "inert",
    "inert_warnings",
    "memory",
    "parse_duration",
    "parse_go_duration",
    "parse_memory_limit",
    "read_table",
    "refusals",
    "refuse",
    "suggest",
    "unsupported",
    "with_meta",
]

# Field metadata understood by the converter.
_DURATION: Final = "duration"  # TOML string like "10s" -> float seconds
_POSITIVE: Final = "positive"  # duration must be > 0
_MEMORY: Final = "memory"  # string checked with parse_memory_limit, kept as written
_MIN: Final = "min"
_MAX: Final = "max"
_CHOICES: Final = "choices"  # case-insensitive string choices, stored lower-case
_ALIASES: Final = "aliases"  # enum spellings that map onto a member
_UNSUPPORTED: Final = "unsupported"  # why a non-default value is refused
_INERT: Final = "inert"  # why a non-default value has no effect (a warning says so)

_PRODUCT: Final = "pynydus"  # named in refusals; the daemon's parser passes "pynydusd"


def duration(default: float, *, positive: bool, **meta: Any) -> Any:
    """A Go duration string ("10s", "1m30s") stored as float seconds."""
    return field(default=default, metadata={_DURATION: True, _POSITIVE: positive, **meta})


def count(default: int, *, minimum: int = 0, maximum: int | None = None, **meta: Any) -> Any:
    """An integer within ``minimum..maximum``."""
    return field(default=default, metadata={_MIN: minimum, _MAX: maximum, **meta})


def choice(default: str, choices: tuple[str, ...], **meta: Any) -> Any:
    """A string from ``choices``, matched case-insensitively, stored lower-case."""
    return field(default=default, metadata={_CHOICES: choices, **meta})


def memory(default: str, **meta: Any) -> Any:
    """A memory size string (see ``parse_memory_limit``), checked and kept as written."""
    return field(default=default, metadata={_MEMORY: True, **meta})


def unsupported(default: Any, reason: str, **meta: Any) -> Any:
    """A key that is understood but not implemented: ``default`` loads, anything else
    stops start-up naming the key and ``reason`` (what it would turn on)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default),
                     metadata={_UNSUPPORTED: reason, **meta})
    return field(default=default, metadata={_UNSUPPORTED: reason, **meta})


def inert(default: Any, reason: str, **meta: Any) -> Any:
    """A key upstream accepts and then does nothing with in what pynydus supports (e.g.
    a path only a refused feature uses): any value loads; a non-default one is named in
    a warning saying why it has no effect."""
    return field(default=default, metadata={_INERT: reason, **meta})


def with_meta(f: Any, **meta: Any) -> Any:
    """``f`` (a field from the helpers above) with more metadata, e.g. ``unsupported``."""
    merged = {**f.metadata, **meta}
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=merged)
    return field(default=f.default, metadata=merged)


# --- value parsers ----------------------------------------------------------------------

# Go's time.ParseDuration units, which upstream's files are written for.
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_WHOLE = re.compile(r"(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration``, in seconds: ``"0"``, or an optional sign and one or
    more number-unit pairs (``"1m30s"``, ``".5s"``, ``"1.5h"``, ``"-250ms"``); units ns,
    us/µs, ms, s, m, h. ValueError for anything else (a bare number other than 0 too)."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not _DURATION_WHOLE.fullmatch(body):
        raise ValueError(f"not a duration: {text!r}")
    seconds = sum(float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(body))
    return -seconds if text[:1] == "-" else seconds


def parse_duration(text: str) -> float:
    """A duration of a config file ("24h", "10s", "1m30s", "500ms", "0") in seconds: Go's
    syntax (:func:`parse_go_duration`), but never negative, since every duration in the
    file is an interval. Raises ConfigError for anything else.
    """
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        raise ConfigError(f'invalid duration "{text}": expected e.g. "10s", "1m", "24h"') from None
    if text[:1] == "-":
        raise ConfigError(f'invalid duration "{text}": an interval cannot be negative')
    return seconds


_MEMORY_UNITS: Final = {
    "B": 1,
    **{f"{p}iB": 1024 ** (i + 1) for i, p in enumerate("KMGTP")},
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTP")},
}
_MEMORY_PLAIN = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MEMORY_WITH_UNIT = re.compile(r"(\d+\.?\d*|\.\d+)([A-Za-z%]+)")


def parse_memory_limit(text: str, total_ram: int) -> int | None:
    """Parse ``cgroup.memory_limit`` into bytes; None means "no limit" (empty string).

    Accepted, as upstream's parser: a plain number of bytes ("1073741824", "1.5e9"), a number
    with unit B, KiB..PiB or Ki..Pi (powers of 1024), or a percentage of ``total_ram`` bytes
    rounded to the nearest byte. Unlike upstream, an unknown unit is an error rather than a
    limit of 0 bytes. Raises ConfigError.
    """
    text = text.strip()
    if text == "":
        return None
    if _MEMORY_PLAIN.fullmatch(text):
        return int(float(text))
    match = _MEMORY_WITH_UNIT.fullmatch(text)
    if match is None:
        raise ConfigError(f'invalid memory limit "{text}": expected e.g. "512MiB", "2Gi" or "10%"')
    value, unit = float(match[1]), match[2]
    if unit == "%":
        return int(total_ram * value / 100 + 0.5)
    if unit not in _MEMORY_UNITS:
        units = ", ".join([*_MEMORY_UNITS, "%"])
        raise ConfigError(f'invalid memory limit "{text}": unknown unit "{unit}" (known: {units})')
    return int(value * _MEMORY_UNITS[unit])


# --- schema walking -------------------------------------------------------------------

Schema = dict[str, tuple[dataclasses.Field[Any], Any]]


_SCHEMAS: dict[type[Any], Schema] = {}
_LEAVES: dict[type[Any], dict[str, tuple[dataclasses.Field[Any], Any]]] = {}


def _schema(cls: type[Any]) -> Schema:
    """Field name -> (field, resolved annotation) of a section dataclass, cached."""
    if cls not in _SCHEMAS:
        hints = type_hints(cls)
        _SCHEMAS[cls] = {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}
    return _SCHEMAS[cls]


def type_hints(cls: type[Any]) -> dict[str, Any]:
    """``typing.get_type_hints(cls)`` of a dataclass: each annotation of the class and its
    bases, a string (PEP 563) evaluated in its class's namespace, then its module's.
    Evaluated with eval, not typing's ForwardRef: that compiles each string, and the first
    ``compile()`` of a process builds the ast module's node classes (0.2 MB of resident
    memory of a daemon, which reads its config at start and otherwise never compiles)."""
    hints: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        namespace = vars(base)  # not inspect.get_annotations: the daemon does without inspect
        annotations = namespace.get("__annotations__", {})
        if not annotations:
            continue
        scope = vars(sys.modules[base.__module__])
        for name, value in annotations.items():
            if isinstance(value, str):
                value = eval(value, scope, dict(namespace))
            hints[name] = type(None) if value is None else value
    return hints


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _section_list(hint: Any) -> type[Any] | None:
    """The dataclass of a ``tuple[Section, ...]`` field (a list of tables), else None."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and _is_section(args[0]):
            return typing.cast(type[Any], args[0])
    return None


def all_leaves(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Dotted key -> (field, annotation) of every leaf (non-section) key under ``cls``."""
    if cls in _LEAVES:
        return _LEAVES[cls]
    leaves: dict[str, tuple[dataclasses.Field[Any], Any]] = {}

    def walk(c: type[Any], prefix: str) -> None:
        for name, (fld, hint) in _schema(c).items():
            if _is_section(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                leaves[f"{prefix}{name}"] = (fld, hint)

    walk(cls, "")
    _LEAVES[cls] = leaves
    return leaves


def describe(value: object) -> str:
    """How a value found in a file is named in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return f"{type(value).__name__} {value}"


def _written(value: object) -> str:
    """A value as it would be written in the file."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def suggest(root: type[Any], cls: type[Any], name: str) -> str:
    """`` (did you mean "…"?)`` for an unknown key ``name`` in section ``cls`` of ``root``."""
    # A key written in the wrong section (e.g. upstream's old [experimental] enable_tarfs)
    # is the likelier mistake than a typo, so an exact name elsewhere is suggested first.
    elsewhere = [k for k in all_leaves(root) if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f' (did you mean "{elsewhere[0]}"?)'
    import difflib  # only for a config with an unknown key

    close = difflib.get_close_matches(name, list(_schema(cls)), n=1, cutoff=0.7)
    return f' (did you mean "{close[0]}"?)' if close else ""


@dataclass
class Recorded:
    """Raw values found so far: dotted key -> (value, origin for messages)."""

    values: dict[str, tuple[object, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def origin(self, key: str, default: str) -> str:
        return self.values[key][1] if key in self.values else default


def collect(table: Mapping[str, object], cls: type[Any], prefix: str, origin: str,
            out: Recorded, *, root: type[Any] | None = None) -> None:
    """Record the keys of ``table`` (section ``cls`` at dotted ``prefix``) in ``out``;
    unknown ones become warnings. Raises ConfigError for a section that is not a table."""
    schema = _schema(cls)
    for name, value in table.items():
        dotted = prefix + name
        entry = schema.get(name)
        if entry is None:
            what = "section" if isinstance(value, dict) else "key"
            hint = suggest(root or cls, cls, name)
            out.warnings.append(f'{origin}: unknown {what} "{dotted}"{hint}')
            continue
        if value is None:  # JSON null: absent
            continue
        if _is_section(entry[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted}: expected a table, got {describe(value)}")
            collect(value, entry[1], dotted + ".", origin, out, root=root or cls)
        else:
            out.values[dotted] = (value, origin)


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _quoted(values: typing.Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _coerce(fld: dataclasses.Field[Any], hint: Any, raw: object, dotted: str, origin: str,
            warnings: list[str]) -> object:
    meta = fld.metadata
    if meta.get(_DURATION):
        expected = 'a duration string such as "10s", "1m" or "24h"'
        if meta.get(_POSITIVE):
            expected = "a positive " + expected.removeprefix("a ")
        if not isinstance(raw, str):
            raise _Mismatch(expected)
        try:
            seconds = parse_duration(raw)
        except ConfigError:
            raise _Mismatch(expected) from None
        if meta.get(_POSITIVE) and seconds <= 0:
            raise _Mismatch(expected)
        return seconds
    if meta.get(_MEMORY):
        expected = 'a memory size string such as "512MiB", "2Gi", "10%" or ""'
        if not isinstance(raw, str):
            raise _Mismatch(expected)
        try:
            parse_memory_limit(raw, 0)
        except ConfigError:
            raise _Mismatch(expected) from None
        return raw
    if hint is bool:
        if not isinstance(raw, bool):
            raise _Mismatch("a boolean")
        return raw
    if hint is int:
        lo, hi = meta.get(_MIN), meta.get(_MAX)
        expected = "an integer"
        if lo is not None and hi is not None:
            expected = f"an integer in {lo}..{hi}"
        elif lo is not None:
            expected = f"an integer >= {lo}"
        # bool is an int subclass in Python but never an integer in TOML or JSON
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _Mismatch(expected)
        if (lo is not None and raw < lo) or (hi is not None and raw > hi):
            raise _Mismatch(expected)
        return raw
    if hint is str:
        if not isinstance(raw, str):
            raise _Mismatch("a string")
        choices: tuple[str, ...] | None = meta.get(_CHOICES)
        if choices is not None:
            if raw.lower() not in choices:
                raise _Mismatch(f"one of {_quoted(choices)}")
            return raw.lower()
        return raw
    if hint is object:  # any value; only ``unsupported`` keys are typed so
        return raw
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        aliases: Mapping[str, object] = meta.get(_ALIASES, {})
        spellings = [*(m.value for m in hint), *aliases]
        if not isinstance(raw, str) or raw not in spellings:
            raise _Mismatch(f"one of {_quoted(spellings)}")
        return aliases[raw] if raw in aliases else hint(raw)
    item = _section_list(hint)
    if item is not None:
        if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
            raise _Mismatch("an array of tables")
        return tuple(read_table(v, item, prefix=f"{dotted}[{i}].", origin=origin,
                                warnings=warnings, refuse_unsupported=False)
                     for i, v in enumerate(raw))
    origin_type, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_type is tuple and args == (str, ...):
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise _Mismatch("an array of strings")
        return tuple(raw)
    if origin_type is dict and args == (str, str):
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise _Mismatch("a table of strings")
        return dict(raw)
    if origin_type is dict:  # a raw table the caller interprets
        if not isinstance(raw, dict):
            raise _Mismatch("a table")
        return raw
    raise AssertionError(f"config schema: no converter for {hint!r}")  # a bug, not a user error


def build(cls: type[Any], prefix: str, recorded: Recorded) -> Any:
    """An instance of ``cls`` from the recorded values under ``prefix`` (defaults for the
    rest). Raises ConfigError naming origin and key for a value of the wrong type."""
    kwargs: dict[str, object] = {}
    for name, (fld, hint) in _schema(cls).items():
        dotted = prefix + name
        if _is_section(hint):
            kwargs[name] = build(hint, dotted + ".", recorded)
        elif dotted in recorded.values:
            raw, origin = recorded.values[dotted]
            try:
                kwargs[name] = _coerce(fld, hint, raw, dotted, origin, recorded.warnings)
            except _Mismatch as err:
                raise ConfigError(
                    f"{origin}: {dotted}: expected {err.expected}, got {describe(raw)}"
                ) from None
    return cls(**kwargs)


def refusals(instance: Any, prefix: str = "", *,
             kind: str = _UNSUPPORTED) -> Iterator[tuple[str, object, object, str]]:
    """(dotted key, value, default, reason) of every ``unsupported`` key (or ``inert``
    with ``kind="inert"``) of ``instance``, lists of tables included, whose value is not
    its default."""
    for name, (fld, hint) in _schema(type(instance)).items():
        dotted = prefix + name
        value = getattr(instance, name)
        if _is_section(hint):
            yield from refusals(value, dotted + ".", kind=kind)
            continue
        if _section_list(hint) is not None:
            for i, item in enumerate(value):
                yield from refusals(item, f"{dotted}[{i}].", kind=kind)
            continue
        reason = fld.metadata.get(kind)
        if reason is None:
            continue
        default = fld.default if fld.default_factory is dataclasses.MISSING \
            else fld.default_factory()
        if value != default:
            yield dotted, value, default, reason


def refuse(instance: Any, origin: Callable[[str], str], *, prefix: str = "",
           product: str = _PRODUCT) -> None:
    """Raise ConfigError for the first ``unsupported`` key of ``instance`` that is not at
    its default (``origin(key)`` says where it came from)."""
    for dotted, value, default, reason in refusals(instance, prefix):
        raise ConfigError(
            f"{origin(dotted)}: {dotted}: {_written(value)} is not supported by {product} yet"
            f" ({reason}); remove it or set it to {_written(default)}"
        )


def inert_warnings(instance: Any, origin: Callable[[str], str], *, prefix: str = "") -> list[str]:
    """A warning per ``inert`` key of ``instance`` set to something else than its default."""
    return [f"{origin(dotted)}: {dotted} = {_written(value)} has no effect ({reason})"
            for dotted, value, _, reason in refusals(instance, prefix, kind=_INERT)]


def read_table(table: Mapping[str, object], cls: type[Any], *, prefix: str = "",
               origin: str = "config", warnings: list[str] | None = None,
               refuse_unsupported: bool = True, product: str = _PRODUCT) -> Any:
    """Collect, convert and (unless told not to) refuse, for one table; warnings for
    unknown keys are appended to ``warnings``."""
    out = Recorded(warnings=warnings if warnings is not None else [])
    collect(table, cls, prefix, origin, out)
    instance = build(cls, prefix, out)
    if refuse_unsupported:
        refuse(instance, lambda key: origin, prefix=prefix, product=product)
    out.warnings.extend(inert_warnings(instance, lambda key: origin, prefix=prefix))
    return instance
