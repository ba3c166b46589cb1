"""Reading a DPO's subjects file for a bulk erasure: CSV with a header row, or JSON lines.

Rows stream out one at a time; memory holds only the set of ids seen (to refuse duplicates).
Every problem is a SubjectsFileError naming the file, the line and what is wrong, never an id
or an identity's value. The rules an id and an identity meet are `lethe.contracts.Subject`'s
(this layer may not import it); the caller builds a Subject from each SubjectRow.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

from lethe.kernel.errors import LetheError

SUBJECT_ID_MAX = 256
"""The longest subject id (characters), as `Subject.subject_id`."""
IDENTITY_MAX = 512
"""The longest identity value (characters), as `Subject.identities`."""
IDENTITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
"""What an identity's name must be, as `Subject.identities`."""
LINE_MAX = 65_536
"""The longest line (bytes): a longer one is refused rather than read into memory."""
IDENTITY_PREFIX = "identity."
"""A column `identity.email` is the identity `email`, as a locator template spells it."""

Format = Literal["csv", "jsonl"]
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
_DELIMITERS = (",", ";", "\t")
_BOMS = {  # UTF-32's before UTF-16's: they start alike
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_UTF8_BOM = b"\xef\xbb\xbf"
_NUL = "holds NUL bytes: the file is UTF-16 or binary; save it as UTF-8"
_NAME_RULE = "lower-case letters, digits and _, starting with a letter, at most 31"


class SubjectRow(NamedTuple):
    """One subject of the file: its id, its identities by name, and the line it starts on."""

    subject_id: str
    identities: dict[str, str]
    line: int

    def __repr__(self) -> str:
        return f"SubjectRow(line={self.line}, identities={sorted(self.identities)})"


@dataclass(frozen=True)
class SubjectsFileSummary:
    """What a valid subjects file holds: counts and names only."""

    subjects: int
    blank_lines: int
    """Empty or white-space-only lines, skipped."""
    identity_names: tuple[str, ...]
    """The identities some subject gives a value for, sorted."""
    format: Format


class SubjectsFileError(LetheError):
    """A subjects file cannot be used: says `file:line: problem`, never an id or identity value."""

    def __init__(self, file: Path, line: int | None, problem: str) -> None:
        self.file, self.line, self.problem = file, line, problem
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {problem}")


def unprintable(value: str) -> str:
    """What makes an identifier unusable (says where, never quotes it), or "": the one check
    of subject ids and identities (`lethe.contracts.Subject` runs it too)."""
    if value.isprintable() and value == value.strip():
        return ""  # isprintable() is False for every category refused below
    for index, char in enumerate(value):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"holds a control character (U+{ord(char):04X}) at position {index + 1}"
    if value != value.strip():
        return "starts or ends with white space"
    return ""


def subject_id_problem(subject_id: str) -> str:
    """Why `subject_id` is not a valid subject id, or ""."""
    if not subject_id.strip():
        return "the subject id is blank"
    if len(subject_id) > SUBJECT_ID_MAX:
        return f"the subject id is {len(subject_id)} characters long; the most is {SUBJECT_ID_MAX}"
    problem = unprintable(subject_id)
    return f"the subject id {problem}" if problem else ""


def identity_problem(name: str, value: str) -> str:
    """Why `value` is not a valid value of the identity `name` (a valid name), or ""."""
    if not value or len(value) > IDENTITY_MAX:
        return f"identity {name} is {len(value)} characters long; it must be 1 to {IDENTITY_MAX}"
    problem = unprintable(value)
    return f"identity {name} {problem}" if problem else ""


def identity_name(column: str) -> str | None:
    """The identity a column or key names (`email` or `identity.email`), or None if invalid."""
    name = column.removeprefix(IDENTITY_PREFIX)
    return name if IDENTITY_NAME.fullmatch(name) else None


def read_subjects(path: Path, *, limit: int) -> Iterator[SubjectRow]:
    """The subjects of a CSV or JSON-lines file, one row at a time, in the file's order.

    Raises SubjectsFileError on the first problem, when iteration reaches it: a malformed line,
    an invalid id or identity, a repeated id, more than `limit` subjects, or none at all.
    """
    return _Reader(path, limit).rows()


def check_subjects(path: Path, *, limit: int) -> SubjectsFileSummary:
    """Read the whole file once and say what it holds; raises SubjectsFileError on a problem."""
    reader = _Reader(path, limit)
    for _ in reader.rows():
        pass
    names = tuple(sorted(reader.identity_names))
    return SubjectsFileSummary(reader.subjects, reader.blank_lines, names, reader.format)


# --- lines -------------------------------------------------------------------------------------


class _Lines:
    """A file's lines as text with their endings, numbered from 1: UTF-8 only (a BOM is
    dropped), and no line longer than LINE_MAX bytes."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle
        self.number = 0
        self.last = ""

    def __iter__(self) -> Iterator[str]:
        while raw := self.handle.readline(LINE_MAX + 1):
            self.number += 1
            if len(raw) > LINE_MAX and not raw.endswith(b"\n"):
                raise self._error(f"is longer than {LINE_MAX:,} bytes")
            if self.number == 1:
                raw = self._first(raw)
            if b"\x00" in raw:
                raise self._error(_NUL if self.number == 1 else "holds a NUL byte")
            try:
                self.last = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                at = f"byte {exc.start + 1}"
                raise self._error(f"is not UTF-8 text ({at}); save the file as UTF-8") from None
            yield self.last

    def _first(self, raw: bytes) -> bytes:
        for bom, encoding in _BOMS.items():
            if raw.startswith(bom):
                raise self._error(f"the file is {encoding} text; save it as UTF-8")
        return raw.removeprefix(_UTF8_BOM)

    def _error(self, problem: str) -> SubjectsFileError:
        return SubjectsFileError(self.path, self.number, problem)


# --- the reader --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """A CSV header: where the subject id is, which cells are which identity, which unnamed."""

    width: int
    subject_id: int
    identities: tuple[tuple[int, str], ...]
    unnamed: tuple[int, ...]


class _Reader:
    """One pass over a subjects file, counting as it goes."""

    def __init__(self, path: Path, limit: int, *, dedupe: bool = True) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.path, self.limit = Path(path), limit
        self.format: Format = "csv"
        self.subjects = self.blank_lines = 0
        self.identity_names: set[str] = set()
        self._seen: set[str] | None = set() if dedupe else None

    def rows(self) -> Iterator[SubjectRow]:
        """The file's subjects, checked, counted and deduplicated."""
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise SubjectsFileError(self.path, None, f"cannot be read ({exc.strerror})") from None
        with handle:
            for row in self._parsed(_Lines(self.path, handle)):
                self._count(row)
                yield row
        if not self.subjects:
            raise SubjectsFileError(self.path, None, "holds no subjects")

    def _count(self, row: SubjectRow) -> None:
        self.subjects += 1
        if self.subjects > self.limit:
            raise self._error(
                row.line,
                f"the file holds more than {self.limit:,} subjects, the most one bulk erasure "
                f"takes; split it into files of at most {self.limit:,}",
            )
        if self._seen is not None:
            if row.subject_id in self._seen:
                first = _first_line(self.path, row.subject_id, self.limit)
                raise self._error(row.line, f"the subject id repeats line {first}'s")
            self._seen.add(row.subject_id)
        self.identity_names.update(row.identities)

    def _parsed(self, lines: _Lines) -> Iterator[SubjectRow]:
        texts = iter(lines)
        for first in texts:
            if first.strip():
                break
            self.blank_lines += 1
        else:
            return
        if first.lstrip().startswith("{") or self.path.suffix.lower() in _JSONL_SUFFIXES:
            self.format = "jsonl"
            yield from self._jsonl(first, texts, lines)
        else:
            yield from self._csv(first, texts, lines)

    def _error(self, line: int | None, problem: str) -> SubjectsFileError:
        return SubjectsFileError(self.path, line, problem)

    # --- JSON lines ---

    def _jsonl(self, first: str, texts: Iterator[str], lines: _Lines) -> Iterator[SubjectRow]:
        yield self._record(first, lines.number)
        for text in texts:
            if text.strip():
                yield self._record(text, lines.number)
            else:
                self.blank_lines += 1

    def _record(self, text: str, line: int) -> SubjectRow:
        record = self._json_object(text, line)
        subject_id = record.get("subject_id")
        if subject_id is None:
            raise self._error(line, "the object has no subject_id")
        if not isinstance(subject_id, str):
            raise self._error(line, f"subject_id is {_kind(subject_id)}, not a string")
        identities: dict[str, str] = {}
        for key, value in record.items():
            if key == "identities":
                if value is not None and not isinstance(value, dict):
                    raise self._error(line, f"identities is {_kind(value)}, not an object")
                for name, item in (value or {}).items():
                    self._identity(identities, name, name, item, line)
            elif key != "subject_id":
                self._identity(identities, key, identity_name(key), value, line)
        return self._row(subject_id, identities, line)

    def _json_object(self, text: str, line: int) -> dict[str, object]:
        array = "; write one JSON object a line, not an array" if text.lstrip()[:1] == "[" else ""
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno}){array}"
            raise self._error(line, problem) from None
        except RecursionError:
            raise self._error(line, "not valid JSON (nested too deeply)") from None
        except _RepeatedKey as exc:
            raise self._error(line, f"the object gives the key {exc.key} twice") from None
        if not isinstance(record, dict):
            raise self._error(line, f"is {_kind(record)}, not a JSON object{array}")
        return record

    def _identity(
        self, into: dict[str, str], key: str, name: str | None, value: object, line: int
    ) -> None:
        if name is None or not IDENTITY_NAME.fullmatch(name):
            raise self._error(
                line, f"the key {_quoted(key)} is not an identity name ({_NAME_RULE})"
            )
        if value is None or value == "":
            return
        if not isinstance(value, str):
            raise self._error(line, f"identity {name} is {_kind(value)}, not a string")
        if name in into:
            raise self._error(line, f"identity {name} is given twice")
        into[name] = value

    # --- CSV ---

    def _csv(self, header: str, texts: Iterator[str], lines: _Lines) -> Iterator[SubjectRow]:
        delimiter = _delimiter(self.path, header)
        columns = self._columns(self._cells([header], delimiter, lines.number), lines.number)
        reader = csv.reader(texts, delimiter=delimiter, strict=True)
        while True:
            start = lines.number + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise self._error(start, f"not valid CSV ({exc})") from None
            if not cells or (lines.number == start and not lines.last.strip()):
                self.blank_lines += 1
                continue
            yield self._csv_row(cells, columns, start)

    def _cells(self, texts: Iterable[str], delimiter: str, line: int) -> list[str]:
        try:
            return next(csv.reader(texts, delimiter=delimiter, strict=True))
        except csv.Error as exc:
            raise self._error(line, f"not valid CSV ({exc})") from None

    def _columns(self, header: list[str], line: int) -> _Columns:
        names = [cell.strip() for cell in header]
        if names.count("subject_id") != 1:
            raise self._error(line, _no_subject_id(names))
        identities: dict[str, int] = {}
        unnamed = []
        for index, column in enumerate(names):
            if column == "subject_id":
                continue
            if not column:
                unnamed.append(index)
                continue
            name = identity_name(column)
            if name is None:
                problem = f"column {index + 1}, {_quoted(column)}, is not an identity name"
                raise self._error(line, f"{problem} ({_NAME_RULE})")
            if name in identities:
                both = f"columns {identities[name] + 1} and {index + 1}"
                raise self._error(line, f"{both} both name identity {name}")
            identities[name] = index
        pairs = tuple((index, name) for name, index in identities.items())
        return _Columns(len(names), names.index("subject_id"), pairs, tuple(unnamed))

    def _csv_row(self, cells: list[str], columns: _Columns, line: int) -> SubjectRow:
        if len(cells) != columns.width:
            have = f"{len(cells)} cell{'s' if len(cells) != 1 else ''}"
            raise self._error(line, f"the row has {have}; the header has {columns.width} columns")
        for index in columns.unnamed:
            if cells[index]:
                raise self._error(line, f"column {index + 1} has no name but holds a value")
        identities = {name: cells[index] for index, name in columns.identities if cells[index]}
        return self._row(cells[columns.subject_id], identities, line)

    # --- both ---

    def _row(self, subject_id: str, identities: dict[str, str], line: int) -> SubjectRow:
        problem = subject_id_problem(subject_id)
        if problem:
            raise self._error(line, problem)
        for name, value in identities.items():
            problem = identity_problem(name, value)
            if problem:
                raise self._error(line, problem)
        return SubjectRow(subject_id, identities, line)


def _first_line(path: Path, subject_id: str, limit: int) -> int:
    """The line of `subject_id`'s first row (read again: only when a repeat is found)."""
    for row in _Reader(path, limit, dedupe=False).rows():
        if row.subject_id == subject_id:
            return row.line
    raise AssertionError("a repeated subject id was not found again")  # pragma: no cover


def _delimiter(path: Path, header: str) -> str:
    """`,` unless the header is split by `;` or tabs (Excel's CSV in some locales, TSV)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {delimiter: header.count(delimiter) for delimiter in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _no_subject_id(names: list[str]) -> str:
    """Why a header has no single subject_id column, naming only cells that look like column
    names (a file with no header starts with data, which must not be quoted)."""
    if names.count("subject_id") > 1:
        return "the header has more than one subject_id column"
    shown = [name for name in names if identity_name(name) is not None]
    hidden = len(names) - len(shown)
    found = ", ".join(shown) if shown else "none"
    if hidden:
        found += f" (and {hidden} not shown that are not column names)"
    near = [name for name in names if re.sub(r"[\s_-]", "", name.lower()) == "subjectid"]
    hint = f"; spell {_quoted(near[0])} as subject_id" if near else ""
    return (
        f"no subject_id column: the first line must be a header naming the columns, "
        f"e.g. subject_id,email; found {found}{hint}"
    )


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = _quoted(key)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's keys, refusing a key given twice (json.loads would keep the last)."""
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _kind(value: object) -> str:
    """A JSON value's kind in words, never the value."""
    if isinstance(value, bool):
        return "true or false"
    kinds = {int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), "null" if value is None else "a string")


def _quoted(name: str) -> str:
    """A column or key name as shown in an error: quoted, cut to 40 characters."""
    return repr(name[:40])
