"""Redis glob patterns as Redis reads them, for matching keys in the worker: the literal text a
pattern's keys start with, and the regular expression of the keys it matches."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple


def literal_prefix(glob: str) -> str:
    """The text every key `glob` matches starts with (up to its first glob character)."""
    return split_glob(glob)[0]


def split_glob(glob: str) -> tuple[str, str]:
    """`glob` as (its literal prefix, unescaped; the rest of the glob, from its first glob
    character on): a key matches `glob` when it starts with the prefix and what follows it
    matches the rest."""
    literal = _LITERAL.match(glob)
    end = literal.end() if literal else 0
    return _ESCAPED.sub(r"\1", glob[:end]), glob[end:]


_LITERAL = re.compile(r"(?:[^*?\[\\]|\\.|\\\Z)*", re.DOTALL)
"""A glob's literal start: characters up to its first `* ? [`, a `\\` escaping the next (a last
`\\` is itself)."""
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def glob_regex(glob: str | bytes) -> bytes:
    """The regular expression (bytes, for `fullmatch` with DOTALL) of the keys a Redis glob
    matches: `*`, `?`, `[...]` (`^` negates, `a-z` either way), `\\` escaping the next
    character, byte by byte as Redis compares."""
    data = glob.encode() if isinstance(glob, str) else glob
    return b"".join(token.regex for token in _tokens(data))


def glob_parts(glob: str) -> tuple[bytes, bytes, bytes]:
    """`glob` as (the bytes every key it matches starts with; the glob from its first glob
    character to the end of its last; the bytes every key it matches ends with): a key
    matches `glob` when it starts with the first, ends with the last, and what is between
    them matches the middle (`glob_regex`). A glob without glob characters is all prefix."""
    text, rest = split_glob(glob)
    data = rest.encode()
    suffix = bytearray()
    last = 0
    for token in _tokens(data):
        if token.literal is None:
            last = token.end
            suffix.clear()
        else:
            suffix.extend(token.literal)
    if not data:
        return text.encode(), b"", b""
    return text.encode(), data[:last], bytes(suffix)


class _Token(NamedTuple):
    regex: bytes
    literal: bytes | None
    """The byte the token stands for; None for `*`, `?` and a class."""
    start: int
    end: int


def _tokens(data: bytes) -> Iterator[_Token]:
    """A glob's tokens, as Redis reads them, in order."""
    i = 0
    while i < len(data):
        byte = data[i : i + 1]
        if byte == b"\\" and i + 1 < len(data):
            yield _Token(re.escape(data[i + 1 : i + 2]), data[i + 1 : i + 2], i, i + 2)
            i += 2
        elif byte in (b"*", b"?"):
            yield _Token(b".*" if byte == b"*" else b".", None, i, i + 1)
            i += 1
        elif byte == b"[":
            part, end = _glob_class(data, i + 1)
            yield _Token(part, None, i, end)
            i = end
        else:
            yield _Token(re.escape(byte), byte, i, i + 1)
            i += 1


def _glob_class(data: bytes, i: int) -> tuple[bytes, int]:
    """The regular expression of the `[...]` class starting after its `[` at `i`, and where
    the glob goes on (open to the end when it never closes)."""
    negate = data[i : i + 1] == b"^"
    i += negate
    items: list[bytes] = []
    while i < len(data) and data[i : i + 1] != b"]":
        if data[i : i + 1] == b"\\" and i + 1 < len(data):
            items.append(re.escape(data[i + 1 : i + 2]))
            i += 2
        elif i + 2 < len(data) and data[i + 1 : i + 2] == b"-":
            low, high = sorted((data[i], data[i + 2]))
            items.append(re.escape(bytes([low])) + b"-" + re.escape(bytes([high])))
            i += 3
        else:
            items.append(re.escape(data[i : i + 1]))
            i += 1
    i += 1  # the closing ]
    if not items:
        return (b"." if negate else b"(?!)"), i
    return b"[" + (b"^" if negate else b"") + b"".join(items) + b"]", i
