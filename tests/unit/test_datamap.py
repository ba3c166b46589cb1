"""The data map: the sample loads, and a bad map fails with the file, the line and the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from lethe.classification.datamap import MissingIdentity, SqlSystem, load_datamap, render
from lethe.kernel.yamlfile import InvalidFile

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "datamap.yaml"


def test_the_sample_map_loads_every_kind() -> None:
    datamap = load_datamap(SAMPLE)
    assert {s.kind for s in datamap.systems} == {"sql", "kafka", "redis", "blob", "logs"}
    assert datamap.tenants["st-mary"].region == "eu"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return path


BASE = """\
version: 1
regions: [eu]
tenants:
  acme: {region: eu}
systems:
  - name: crm
    kind: sql
    region: eu
    connection: CRM_URL
    tables:
      - table: people
        subject_column: id
        columns:
          email: user.contact.email
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "user.contact.email",
            "user.contact.emial",
            r"map.yaml:14: systems\[0\].tables\[0\].columns.email: category",
        ),
        ("user.contact.email", "user.contact.emial", "closest known key is 'user.contact'"),
        ("region: eu\n    connection", "region: mars\n    connection", "not one of the regions"),
        ("connection: CRM_URL", "connection: postgresql://u:pw@h/db", r"map.yaml:9: .*connection"),
        ("table: people", "table: people; DROP TABLE x", r"map.yaml:11: .*table"),
        ("subject_column: id", "subject_colum: id", "subject_colum"),
        ("kind: sql", "kind: mainframe", r"map.yaml:6: systems\[0\]: .*'mainframe'"),
    ],
)
def test_a_bad_map_names_file_line_and_problem(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = _write(tmp_path, BASE.replace(old, new))
    with pytest.raises(InvalidFile, match=expected) as caught:
        load_datamap(path)
    assert "pw@h" not in str(caught.value) or "connection" in expected


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "  - name: [unclosed\n")
    with pytest.raises(InvalidFile, match=r"map.yaml:\d+: not valid YAML"):
        load_datamap(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidFile, match=r"nope\.yaml: cannot be read"):
        load_datamap(tmp_path / "nope.yaml")


def test_duplicate_system_names_are_refused(tmp_path: Path) -> None:
    doubled = BASE + BASE[BASE.index("  - name: crm") :]
    with pytest.raises(InvalidFile, match="repeated: crm"):
        load_datamap(_write(tmp_path, doubled))


def test_templates_must_identify_the_subject(tmp_path: Path) -> None:
    text = BASE + (
        "  - name: cache\n    kind: redis\n    region: eu\n    connection: R\n"
        "    keys:\n      - patterns: ['sessions:*']\n        categories: [user]\n"
    )
    with pytest.raises(InvalidFile, match="no placeholder"):
        load_datamap(_write(tmp_path, text))


def test_render_fills_and_escapes_values_only() -> None:
    values = {"subject_id": "a*b", "identity.email": "x@y"}
    assert render("p:{subject_id}:*", values, escape=lambda v: v.replace("*", r"\*")) == r"p:a\*b:*"
    assert render("{identity.email}", values) == "x@y"
    with pytest.raises(MissingIdentity, match=r"\{identity.mrn\}"):
        render("m:{identity.mrn}", values)


def test_a_table_maps_identities_to_its_columns(tmp_path: Path) -> None:
    text = BASE + "        identities: {email: email, mrn: _mrn2}\n"
    mapped, plain = (load_datamap(_write(tmp_path, t)).systems[0] for t in (text, BASE))
    assert isinstance(mapped, SqlSystem) and isinstance(plain, SqlSystem)
    assert mapped.tables[0].identities == {"email": "email", "mrn": "_mrn2"}
    assert plain.tables[0].identities == {}


@pytest.mark.parametrize(
    ("identities", "expected"),
    [
        ("{Email: email}", r"table 'people': identity 'Email' is not an identity name"),
        ("{e-mail: email}", r"table 'people': identity 'e-mail' is not an identity name"),
        ("{email: e-mail}", r"table 'people': identity 'email' names 'e-mail', which is not"),
        ("{email: other.email}", r"identity 'email' names 'other.email', which is not a SQL"),
        ("{email: 7up}", r"identity 'email' names '7up'"),
        ("{email: [a]}", r"identities.email: Input should be a valid string"),
        ("[email]", r"identities: Input should be a valid dictionary"),
    ],
)
def test_a_bad_identity_column_names_the_table_and_identity(
    tmp_path: Path, identities: str, expected: str
) -> None:
    path = _write(tmp_path, BASE + f"        identities: {identities}\n")
    with pytest.raises(InvalidFile, match=r"map.yaml:\d+: systems\[0\].tables\[0\]"):
        load_datamap(path)
    with pytest.raises(InvalidFile, match=expected):
        load_datamap(path)
