"""containerd's filter language, for List (Walk) of snapshots.

Grammar (containerd ``filters`` package)::

    selectors := selector ("," selector)*        all must match (AND)
    selector  := fieldpath [operator value]      no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="              "~=" is a regular expression search
    value     := quoted | [^\\s,]+
    quoted    := "..." (Go string syntax); a ~= value may also be quoted /.../ or |...|

Several filter strings in one request match if any one matches (OR). For
snapshots the fields are ``kind`` (``active``, ``view``, ``committed``),
``name``, ``parent`` and ``labels.<key>`` (a key containing dots is written
quoted: ``labels."containerd.io/gc.root"``).

Deliberate difference from containerd: a ``~=`` pattern that does not compile is
an InvalidArgument error at parse time instead of silently matching nothing.
Patterns use Python's ``re`` (close to Go's RE2 for the patterns people write).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pynydus.errors import InvalidArgument

# A field lookup: fieldpath -> (value, present)
Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_EOF = ""
_QUOTES = {'"', "/", "|"}
_OPERATORS = {"==", "!=", "~="}


def _is_field_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "-_")


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = ""  # "" means presence
    value: str = ""
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """A disjunction of conjunctions: matches if every selector of any one clause matches."""

    clauses: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.clauses:
            return True
        return any(all(s.match(adaptor) for s in clause) for clause in self.clauses)


class _Parser:
    """Recursive descent over containerd's token rules (see module docstring)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, pos: int, msg: str) -> InvalidArgument:
        if pos < len(self.text):
            where = f"[{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1:]}]"
        else:
            where = f"[{self.text}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == _EOF:
                return tuple(selectors)
            if ch != ",":
                raise self.error(self.pos, f"unexpected input: {ch}")
            self.pos += 1
            selectors.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        ch = self.peek()
        if ch in (",", _EOF):
            return Selector(path)
        op_pos = self.pos
        op = self.operator()
        value = self.value(allow_alt_quotes=op == "~=")
        pattern = None
        if op == "~=":
            try:
                pattern = re.compile(value)
            except re.error as err:
                raise self.error(op_pos, f"invalid regular expression {value!r}: {err}") from err
        return Selector(path, op, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        ch = self.peek()
        start = self.pos
        if ch == '"':
            return self.quoted(ch)
        if ch != _EOF and _is_field_char(ch):
            while self.pos < len(self.text) and _is_field_char(self.text[self.pos]):
                self.pos += 1
            return self.text[start:self.pos]
        raise self.error(start, "expected field or quoted")

    def operator(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "=!~":
            self.pos += 1
        op = self.text[start:self.pos]
        if not op:
            raise self.error(start, 'expected an operator ("=="|"!="|"~=")')
        if op not in _OPERATORS:
            raise self.error(start, f"unsupported operator {op!r}")
        return op

    def value(self, allow_alt_quotes: bool) -> str:
        ch = self.peek()
        start = self.pos
        if ch in _QUOTES:
            if ch != '"' and not allow_alt_quotes:  # /re/ and |re| are for ~= only
                raise self.error(start, "invalid quote encountered")
            return self.quoted(ch)
        if ch in (_EOF, ","):
            raise self.error(start, "expected value or quoted")
        while self.pos < len(self.text) and _is_value_char(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            raise self.error(start, "expected value or quoted")
        return self.text[start:self.pos]

    def quoted(self, quote: str) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error(start, "quoted literal not terminated")
            ch = self.text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\\":
                out.append(self.escape(quote))
                continue
            out.append(ch)
            self.pos += 1

    def escape(self, quote: str) -> str:
        start = self.pos
        self.pos += 1  # the backslash
        if self.pos >= len(self.text):
            raise self.error(start, "quoted literal not terminated")
        ch = self.text[self.pos]
        simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                  "v": "\v", "\\": "\\", quote: quote}
        if ch in simple:
            self.pos += 1
            # In /regex/ and |regex| literals a backslash that is not escaping the
            # delimiter belongs to the pattern (\d, \.), so keep it.
            if quote != '"' and ch not in (quote,):
                return "\\" + ch
            return simple[ch]
        if quote != '"':
            self.pos += 1
            return "\\" + ch
        widths = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
        if ch in widths:
            base, n = widths[ch]
            digits = self.text[self.pos + 1:self.pos + 1 + n]
            self.pos += 1
        elif ch in "01234567":
            base, n = 8, 3
            digits = self.text[self.pos:self.pos + n]
        else:
            raise self.error(start, "illegal escape sequence")
        try:
            if len(digits) != n:
                raise ValueError(digits)
            code = int(digits, base)
            self.pos += n
            return chr(code)
        except ValueError as err:
            raise self.error(start, "illegal numeric escape sequence") from err


def parse(filters: Iterable[str]) -> Filter:
    """Parse filter strings (OR of them). Empty list or empty strings match everything.

    Raises InvalidArgument naming the position of the first syntax error.
    """
    clauses: list[tuple[Selector, ...]] = []
    for text in filters:
        if text == "":
            return Filter(())  # containerd: an empty filter matches everything
        clauses.append(_Parser(text).parse())
    return Filter(tuple(clauses))


_KIND_NAMES = {1: "view", 2: "active", 3: "committed"}


def snapshot_adaptor(name: str, parent: str, kind: int, labels: Mapping[str, str]) -> Adaptor:
    """Field lookup for a snapshot, as containerd's snapshot adaptor defines it."""

    def lookup(path: tuple[str, ...]) -> tuple[str, bool]:
        head = path[0] if path else ""
        if head == "kind":
            kind_name = _KIND_NAMES.get(kind)
            return (kind_name, True) if kind_name else ("", False)
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            key = ".".join(path[1:])
            if key in labels:
                return labels[key], True
            return "", False
        return "", False

    return lookup
