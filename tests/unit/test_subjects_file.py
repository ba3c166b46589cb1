"""A DPO's subjects file (CSV or JSON lines) is read row by row, and every problem is refused
with the file's line number and never the id or identity it is about."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from lethe.contracts import BULK_MAX_SUBJECTS, Subject
from lethe.kernel.subjects_file import (
    SubjectRow,
    SubjectsFileError,
    SubjectsFileSummary,
    check_subjects,
    identity_problem,
    read_subjects,
    subject_id_problem,
)

LIMIT = 1_000
INJECTIONS = ["x'; DROP TABLE patients; --", "*", "p-%", "?", "a\\b", "{subject_id}", '"q"']


def _file(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", newline="")
    else:
        path.write_bytes(text)
    return path


def _quote(cell: str) -> str:
    """A CSV cell, quoted as a spreadsheet writes it."""
    return '"' + cell.replace('"', '""') + '"'


def _refused(path: Path, *secrets: str, limit: int = LIMIT) -> str:
    """The message `check_subjects` refuses the file with; it quotes none of `secrets`."""
    with pytest.raises(SubjectsFileError) as caught:
        check_subjects(path, limit=limit)
    message = str(caught.value)
    assert message.startswith(f"{path}:")
    for secret in secrets:
        assert secret not in message
    return message


def _rows(path: Path) -> list[SubjectRow]:
    return list(read_subjects(path, limit=LIMIT))


# --- CSV -------------------------------------------------------------------------------------


def test_csv_rows_identities_blank_lines_and_summary(tmp_path: Path) -> None:
    text = (
        "\ufeffsubject_id,email,identity.mrn\r\n"
        "p-1,ada@example.org,\r\n"
        "\r\n"
        "   \r\n"
        "p-2,,M-2\r\n"
        'p-3,"grace, h@example.org",M-3\r\n'
    )
    path = _file(tmp_path, "subjects.csv", text)
    assert _rows(path) == [
        ("p-1", {"email": "ada@example.org"}, 2),
        ("p-2", {"mrn": "M-2"}, 5),
        ("p-3", {"email": "grace, h@example.org", "mrn": "M-3"}, 6),
    ]
    assert check_subjects(path, limit=LIMIT) == SubjectsFileSummary(
        subjects=3, blank_lines=2, identity_names=("email", "mrn"), format="csv"
    )


def test_csv_with_only_a_subject_id_column_and_no_final_newline(tmp_path: Path) -> None:
    path = _file(tmp_path, "ids.txt", "subject_id\np-1\n\np-2")
    assert _rows(path) == [("p-1", {}, 2), ("p-2", {}, 4)]
    summary = check_subjects(path, limit=LIMIT)
    assert (summary.subjects, summary.blank_lines, summary.identity_names) == (2, 1, ())


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("excel.csv", "subject_id;email\np-1;ada@example.org\n"),
        ("tabs.tsv", "subject_id\temail\np-1\tada@example.org\n"),
        ("tabs.txt", "subject_id\temail\np-1\tada@example.org\n"),
    ],
)
def test_csv_split_by_semicolons_or_tabs(tmp_path: Path, name: str, text: str) -> None:
    assert _rows(_file(tmp_path, name, text)) == [("p-1", {"email": "ada@example.org"}, 2)]


def test_csv_an_unnamed_empty_column_is_ignored(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", "subject_id,email,\np-1,a@example.org,\n")
    assert _rows(path) == [("p-1", {"email": "a@example.org"}, 2)]
    path = _file(tmp_path, "t.csv", "subject_id,email,\np-1,a@example.org,\np-2,,SECRET\n")
    assert _refused(path, "SECRET") == f"{path}:3: column 3 has no name but holds a value"


def test_csv_a_quoted_cell_spanning_lines_is_refused_at_its_first_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", 'subject_id,email\np-1,a@x.org\n"p-\n2",b@x.org\np-3,\n')
    message = _refused(path)
    assert message == f"{path}:3: the subject id holds a control character (U+000A) at position 3"


def test_csv_injection_shaped_ids_are_data(tmp_path: Path) -> None:
    body = "".join(f"{_quote(s)},{_quote(s + '@x')}\n" for s in INJECTIONS)
    path = _file(tmp_path, "s.csv", "subject_id,identity.handle\n" + body)
    rows = _rows(path)
    assert [row[0] for row in rows] == INJECTIONS
    assert [row[1] for row in rows] == [{"handle": f"{s}@x"} for s in INJECTIONS]


def test_csv_missing_subject_id_names_the_columns_found(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", "email,identity.mrn\na@example.org,M-1\n")
    message = _refused(path)
    assert message.startswith(f"{path}:1: no subject_id column")
    assert "found email, identity.mrn" in message


def test_csv_missing_header_quotes_no_data(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", "Ada Lovelace,ada@example.org\nGrace,grace@example.org\n")
    message = _refused(path, "Ada", "ada@example.org")
    assert "no subject_id column" in message
    assert "found none (and 2 not shown that are not column names)" in message


def test_csv_near_miss_subject_id_header_is_named(tmp_path: Path) -> None:
    message = _refused(_file(tmp_path, "s.csv", "Subject ID,email\np-1,a@x\n"))
    assert "spell 'Subject ID' as subject_id" in message
    assert "found email (and 1 not shown" in message


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("subject_id,email,subject_id", "the header has more than one subject_id column"),
        ("subject_id,email,identity.email", "columns 2 and 3 both name identity email"),
        (
            "subject_id,E-Mail",
            "column 2, 'E-Mail', is not an identity name (lower-case letters, digits and _, "
            "starting with a letter, at most 31)",
        ),
        ("subject_id,identity.", "column 2, 'identity.', is not an identity name"),
        ("subject_id," + "a" * 32, f"column 2, '{'a' * 32}', is not an identity name"),
        ('subject_id,"email', "not valid CSV (unexpected end of data)"),
    ],
)
def test_csv_bad_headers(tmp_path: Path, header: str, problem: str) -> None:
    path = _file(tmp_path, "s.csv", f"{header}\np-1,a,b\n")
    assert _refused(path).startswith(f"{path}:1: {problem}")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("p-1", "the row has 1 cell; the header has 2 columns"),
        ("p-1,SECRET,x", "the row has 3 cells; the header has 2 columns"),
        (",SECRET", "the subject id is blank"),
        ('"   ",SECRET', "the subject id is blank"),
        (" SECRET,", "the subject id starts or ends with white space"),
        ("SECRET ,", "the subject id starts or ends with white space"),
        ('"SE\tCRET",', "the subject id holds a control character (U+0009) at position 3"),
        ("SECRET\u200b,", "the subject id holds a control character (U+200B) at position 7"),
        ("S" * 257 + ",", "the subject id is 257 characters long; the most is 256"),
        ("p-1,SECRET ", "identity email starts or ends with white space"),
        ("p-1,SEC\u2028RET", "identity email holds a control character (U+2028) at position 4"),
        ("p-1," + "S" * 513, "identity email is 513 characters long; it must be 1 to 512"),
        ('p-1,"SE"CRET', "not valid CSV (',' expected after '\"')"),
    ],
)
def test_csv_bad_rows_name_the_line(tmp_path: Path, row: str, problem: str) -> None:
    path = _file(tmp_path, "s.csv", f"subject_id,email\np-0,ok@x\n\n{row}\np-9,\n")
    assert _refused(path, "SECRET", "S" * 100).startswith(f"{path}:4: {problem}")


def test_csv_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    text = "subject_id,email\nSECRET-1,a@x\nSECRET-2,b@x\n\nSECRET-1,c@x\n"
    path = _file(tmp_path, "s.csv", text)
    message = _refused(path, "SECRET")
    assert message == f"{path}:5: the subject id repeats line 2's"


def test_rows_stream_before_a_later_problem(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", "subject_id\np-1\np-2\n,\n")
    rows = read_subjects(path, limit=LIMIT)
    assert next(rows) == SubjectRow("p-1", {}, 2)
    assert next(rows) == SubjectRow("p-2", {}, 3)
    with pytest.raises(SubjectsFileError, match=r":4: the row has 2 cells"):
        next(rows)


# --- JSON lines ------------------------------------------------------------------------------


def test_jsonl_nested_and_flat_identities_and_summary(tmp_path: Path) -> None:
    records = [
        {"subject_id": "p-1", "identities": {"email": "ada@example.org"}},
        {"subject_id": "p-2", "email": "grace@example.org", "identity.mrn": "M-2"},
        {"subject_id": "p-3", "identities": {"email": "", "mrn": None}, "phone": None},
        {"subject_id": "p-4", "identities": None},
    ]
    lines = [json.dumps(record) for record in records]
    path = _file(
        tmp_path,
        "subjects.jsonl",
        "\ufeff" + "\n".join(lines[:2]) + "\n \n\n" + "\n".join(lines[2:]),
    )
    assert _rows(path) == [
        ("p-1", {"email": "ada@example.org"}, 1),
        ("p-2", {"email": "grace@example.org", "mrn": "M-2"}, 2),
        ("p-3", {}, 5),
        ("p-4", {}, 6),
    ]
    assert check_subjects(path, limit=LIMIT) == SubjectsFileSummary(
        subjects=4, blank_lines=2, identity_names=("email", "mrn"), format="jsonl"
    )


def test_jsonl_by_content_whatever_the_extension(tmp_path: Path) -> None:
    path = _file(tmp_path, "export.txt", '\n{"subject_id": "p-1"}\n')
    assert check_subjects(path, limit=LIMIT).format == "jsonl"
    assert _rows(path) == [("p-1", {}, 2)]


def test_jsonl_by_extension_when_the_content_is_not_an_object(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.jsonl", "subject_id,email\n")
    assert _refused(path).startswith(f"{path}:1: not valid JSON")


def test_jsonl_injection_shaped_ids_are_data(tmp_path: Path) -> None:
    text = "".join(json.dumps({"subject_id": s, "handle": s}) + "\n" for s in INJECTIONS)
    rows = _rows(_file(tmp_path, "s.jsonl", text))
    assert [(row[0], row[1]) for row in rows] == [(s, {"handle": s}) for s in INJECTIONS]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"subject_id": "SECRET", ', "not valid JSON (Expecting property name enclosed"),
        ('{"subject_id": "SECRET"} x', "not valid JSON (Extra data at column 26)"),
        ('["SECRET"]', "is a list, not a JSON object; write one JSON object a line"),
        ('"SECRET"', "is a string, not a JSON object"),
        ('{"email": "SECRET"}', "the object has no subject_id"),
        ('{"subject_id": null, "email": "SECRET"}', "the object has no subject_id"),
        ('{"subject_id": 12345}', "subject_id is a number, not a string"),
        ('{"subject_id": ["SECRET"]}', "subject_id is a list, not a string"),
        ('{"subject_id": "p-1", "email": 7}', "identity email is a number, not a string"),
        ('{"subject_id": "p-1", "email": true}', "identity email is true or false, not a string"),
        ('{"subject_id": "p-1", "identities": {"e": {"x": 1}}}', "identity e is an object"),
        ('{"subject_id": "p-1", "identities": ["SECRET"]}', "identities is a list, not an object"),
        ('{"subject_id": "p-1", "identities": "SECRET"}', "identities is a string, not an object"),
        (
            '{"subject_id": "p-1", "email": "SECRET", "identities": {"email": "SECRET"}}',
            "identity email is given twice",
        ),
        (
            '{"subject_id": "p-1", "subject_id": "SECRET"}',
            "the object gives the key 'subject_id' twice",
        ),
        ('{"subject_id": "p-1", "E-Mail": "SECRET"}', "the key 'E-Mail' is not an identity name"),
        (
            '{"subject_id": "p-1", "identities": {"identity.email": "SECRET"}}',
            "the key 'identity.email' is not an identity name",
        ),
        ('{"subject_id": ""}', "the subject id is blank"),
        ('{"subject_id": " \\t "}', "the subject id is blank"),
        ('{"subject_id": "SECRET\\u0007"}', "the subject id holds a control character (U+0007)"),
        ('{"subject_id": "SECRET "}', "the subject id starts or ends with white space"),
        ('{"subject_id": "' + "S" * 300 + '"}', "the subject id is 300 characters long"),
        ('{"subject_id": "p-1", "mrn": " SECRET"}', "identity mrn starts or ends with white"),
        ('{"subject_id": "p-1", "mrn": "SEC\\u0000RET"}', "identity mrn holds a control char"),
        ("[" * 60_000, "not valid JSON (nested too deeply)"),
    ],
)
def test_jsonl_bad_lines_name_the_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _file(
        tmp_path, "s.jsonl", f'{{"subject_id": "p-0"}}\n\n{line}\n{{"subject_id": "p-9"}}\n'
    )
    assert _refused(path, "SECRET", "S" * 100).startswith(f"{path}:3: {problem}")


def test_jsonl_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    text = '{"subject_id": "SECRET-1"}\n{"subject_id": "SECRET-2"}\n{"subject_id": "SECRET-1"}\n'
    path = _file(tmp_path, "s.jsonl", text)
    assert _refused(path, "SECRET") == f"{path}:3: the subject id repeats line 1's"


def test_jsonl_array_file_is_told_to_use_json_lines(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.json", '[\n{"subject_id": "SECRET"}\n]\n')
    message = _refused(path, "SECRET")
    assert message.startswith(f"{path}:1: not valid JSON")
    assert message.endswith("write one JSON object a line, not an array")


# --- both: encodings, sizes, limits ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("s.csv", "subject_id\nJosé\n".encode("latin-1"), "2: is not UTF-8 text (byte 4)"),
        ("s.csv", "subject_id\np-1\n".encode("utf-16"), "1: the file is UTF-16 text"),
        ("s.csv", "subject_id\np-1\n".encode("utf-16-le"), "1: holds NUL bytes"),
        ("s.jsonl", '{"subject_id": "p"}\n'.encode("utf-32"), "1: the file is UTF-32 text"),
        ("s.jsonl", b'{"subject_id": "p"}\n{"subject_id": "SE\x00"}\n', "2: holds a NUL byte"),
        ("s.jsonl", '{"subject_id": "Zoë"}\n'.encode("cp1252"), "1: is not UTF-8 text"),
    ],
)
def test_other_encodings_are_refused(tmp_path: Path, name: str, data: bytes, problem: str) -> None:
    path = _file(tmp_path, name, data)
    message = _refused(path, "Jos", "Zo")
    assert message.startswith(f"{path}:{problem}")
    assert "NUL byte" in message or ("save" in message and "UTF-8" in message)


@pytest.mark.parametrize("text", ["", "\n  \n", "\ufeff", "subject_id,email\n\n"])
def test_a_file_with_no_subjects_is_refused(tmp_path: Path, text: str) -> None:
    path = _file(tmp_path, "s.csv", text)
    assert _refused(path) == f"{path}: holds no subjects"


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path / "absent.csv").endswith("cannot be read (No such file or directory)")


def test_an_over_long_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = _file(tmp_path, "s.csv", "subject_id\n" + "S" * 10_000_000)
    assert _refused(path, "S" * 100) == f"{path}:2: is longer than 65,536 bytes"


@pytest.mark.parametrize(
    ("name", "row"),
    [("s.csv", "p-{n}\n"), ("s.jsonl", '{{"subject_id": "p-{n}"}}\n')],
)
def test_more_subjects_than_the_limit_are_refused_at_the_first_extra(
    tmp_path: Path, name: str, row: str
) -> None:
    header = "subject_id\n\n" if name.endswith(".csv") else "\n\n"
    rows = "".join(row.format(n=n) for n in range(3))
    assert check_subjects(_file(tmp_path, name, header + rows), limit=3).subjects == 3
    rest = (row.format(n=3) + "\n").encode() + b"\xff\x00 never read\n" * 1000
    path = _file(tmp_path, name, (header + rows).encode() + rest)
    assert _refused(path, limit=3) == (
        f"{path}:6: the file holds more than 3 subjects, the most one bulk erasure takes; "
        "split it into files of at most 3"
    )


_BIG = """
import json, resource, sys, time
from pathlib import Path
from lethe.kernel.subjects_file import SubjectsFileError, check_subjects
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    check_subjects(Path(sys.argv[1]), limit=int(sys.argv[2]))
    error = None
except SubjectsFileError as exc:
    error = str(exc)
seconds = time.perf_counter() - started
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(json.dumps({"seconds": seconds, "grown_mib": grown, "error": error}))
"""


def test_a_ten_million_line_file_is_refused_quickly_in_little_memory(tmp_path: Path) -> None:
    """The limit stops reading at its first extra subject: 10,000,001 lines (about 90 MiB) are
    refused after reading 1,000,002, in seconds, holding only the ids seen."""
    path = tmp_path / "huge.csv"
    with path.open("wb") as out:
        out.write(b"subject_id\n")
        for start in range(0, 10_000_000, 250_000):
            out.write(b"".join(b"p-%d\n" % n for n in range(start, start + 250_000)))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BIG), str(path), str(BULK_MAX_SUBJECTS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(run.stdout)
    assert measured["error"] == (
        f"{path}:1000002: the file holds more than 1,000,000 subjects, the most one bulk "
        "erasure takes; split it into files of at most 1,000,000"
    )
    assert measured["seconds"] < 15, measured
    # The million ids seen take tens of MiB; holding all ten million would take ~1 GiB.
    assert measured["grown_mib"] < 200, measured


# --- the rules are Subject's -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "p-1",
        "x'; DROP TABLE patients; --",
        "*",
        "José Ñúñez",
        "a\u00a0b",
        "S" * 256,
        "S" * 257,
        " p",
        "p ",
        "\u00a0p",
        "p\t1",
        "p\u200b",
        "p\u2029",
        "p\x7f",
        "",
        "   ",
        "\U0001f600",
    ],
)
def test_the_rules_agree_with_subject(value: str) -> None:
    try:
        Subject(tenant="t", subject_id=value)
        id_valid = True
    except ValidationError:
        id_valid = False
    assert (subject_id_problem(value) == "") is id_valid
    try:
        Subject(tenant="t", subject_id="p", identities={"email": value})
        identity_valid = True
    except ValidationError:
        identity_valid = False
    assert (identity_problem("email", value) == "") is identity_valid


def test_a_row_does_not_print_the_subject(tmp_path: Path) -> None:
    row = SubjectRow("SECRET", {"email": "SECRET@x"}, 2)
    assert repr(row) == "SubjectRow(line=2, identities=['email'])"
    assert "SECRET" not in str(row)
