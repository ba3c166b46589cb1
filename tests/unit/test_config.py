"""Settings: defaults, and bad values failing at start with the setting named, never its value."""

from __future__ import annotations

import base64

import pytest

from lethe.config import Settings, connection, load_settings, parse_key_ring
from lethe.errors import ConfigurationError

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(32, 64))).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LETHE_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_a_local_server_and_a_sqlite_store() -> None:
    settings = load_settings()
    assert settings.temporal_address == "127.0.0.1:7233"
    assert settings.store_url.get_secret_value().startswith("sqlite+aiosqlite:///")
    assert settings.key_ring == {}


def test_missing_codec_key_says_how_to_make_one() -> None:
    with pytest.raises(ConfigurationError, match="lethe codec new-key"):
        _ = load_settings().current_codec_key_id


def test_key_ring_keeps_order_and_first_key_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_CODEC_KEYS", f"new:{KEY}, old:{OTHER}")
    settings = load_settings()
    assert list(settings.key_ring) == ["new", "old"]
    assert settings.current_codec_key_id == "new"


def test_current_key_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_CODEC_KEYS", f"new:{KEY},old:{OTHER}")
    monkeypatch.setenv("LETHE_CODEC_KEY_ID", "old")
    assert load_settings().current_codec_key_id == "old"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("LETHE_TEMPORAL_ADDRESS", "no-port-here", "LETHE_TEMPORAL_ADDRESS"),
        ("LETHE_STORE_URL", "not a url", "LETHE_STORE_URL: is not a SQLAlchemy database URL"),
        ("LETHE_CODEC_KEYS", "k1:short", "LETHE_CODEC_KEYS: key 'k1' is not valid base64"),
        ("LETHE_CODEC_KEYS", "k1:" + base64.b64encode(b"x" * 16).decode(), "must be 32 bytes"),
        ("LETHE_CODEC_KEY_ID", "absent", "not in LETHE_CODEC_KEYS"),
        ("LETHE_TEMPORAL_TLS_SERVER_CA", "/nonexistent/ca.pem", "does not exist"),
        ("LETHE_WORKER_SHUTDOWN_GRACE_SECONDS", "-1", "LETHE_WORKER_SHUTDOWN_GRACE_SECONDS"),
        ("LETHE_METRICS_BIND", "9464", "LETHE_METRICS_BIND"),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=problem):
        load_settings()


def test_a_bad_key_ring_never_echoes_key_material(monkeypatch: pytest.MonkeyPatch) -> None:
    secret_ish = base64.b64encode(b"s" * 31).decode()
    monkeypatch.setenv("LETHE_CODEC_KEYS", f"k1:{secret_ish}")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert secret_ish not in str(caught.value)


def test_store_url_password_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_STORE_URL", "postgresql+psycopg://lethe:hunter2@db/lethe")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    monkeypatch.setenv("LETHE_STORE_URL", "hunter2 is not a url")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_duplicate_key_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        parse_key_ring(f"a:{KEY},a:{OTHER}")


def test_tls_client_cert_needs_its_key(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    cert = Path(str(tmp_path)) / "client.pem"
    cert.write_text("cert")
    monkeypatch.setenv("LETHE_TEMPORAL_TLS_CLIENT_CERT", str(cert))
    with pytest.raises(ConfigurationError, match="go together"):
        load_settings()


def test_connection_reads_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATIENTS_DB_URL", "postgresql+psycopg://x@h/db")
    assert connection("PATIENTS_DB_URL").get_secret_value() == "postgresql+psycopg://x@h/db"


def test_connection_refuses_a_secret_in_place_of_a_name() -> None:
    with pytest.raises(ConfigurationError, match="name of an environment variable") as caught:
        connection("postgresql://user:hunter2@db/patients")
    assert "hunter2" not in str(caught.value)


def test_connection_names_the_missing_variable() -> None:
    with pytest.raises(ConfigurationError, match="PATIENTS_DB_URL is not set"):
        connection("PATIENTS_DB_URL")


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.temporal_namespace = "other"  # type: ignore[misc]
