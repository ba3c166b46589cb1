"""Settings: defaults, and bad values failing at start with the setting named, never its value."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from lethe.kernel.config import Settings, connection, load_env_file, load_settings
from lethe.kernel.errors import ConfigurationError

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LETHE_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_a_local_server_and_a_sqlite_store() -> None:
    settings = load_settings()
    assert settings.temporal_address == "127.0.0.1:7233"
    assert settings.store_url.get_secret_value().startswith("sqlite+aiosqlite:///")
    assert settings.key_store_url == settings.store_url.get_secret_value()


def test_missing_master_key_says_how_to_make_one() -> None:
    with pytest.raises(ConfigurationError, match="lethe codec new-secret"):
        _ = load_settings().keys_master_key_bytes


def test_the_key_store_can_live_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_KEYS_STORE_URL", "postgresql+psycopg://keys@db/keys")
    monkeypatch.setenv("LETHE_KEYS_MASTER_KEY", KEY)
    settings = load_settings()
    assert settings.key_store_url == "postgresql+psycopg://keys@db/keys"
    assert settings.keys_master_key_bytes == bytes(range(32))


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("LETHE_TEMPORAL_ADDRESS", "no-port-here", "LETHE_TEMPORAL_ADDRESS"),
        ("LETHE_STORE_URL", "not a url", "LETHE_STORE_URL: is not a SQLAlchemy database URL"),
        ("LETHE_KEYS_MASTER_KEY", "short", "LETHE_KEYS_MASTER_KEY: the key is not valid base64"),
        ("LETHE_KEYS_MASTER_KEY", base64.b64encode(b"x" * 16).decode(), "must be 32 bytes"),
        ("LETHE_KEYS_STORE_URL", "not a url", "LETHE_KEYS_STORE_URL: is not a SQLAlchemy"),
        ("LETHE_KEYS_MAX_ENCRYPTIONS", "0", "LETHE_KEYS_MAX_ENCRYPTIONS"),
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


def test_a_bad_master_key_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret_ish = base64.b64encode(b"s" * 31).decode()
    monkeypatch.setenv("LETHE_KEYS_MASTER_KEY", secret_ish)
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


def test_an_env_file_fills_only_what_the_environment_lacks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = tmp_path / "env"
    env.write_text(
        "# written by scripts/stack up\n"
        "export LETHE_TEMPORAL_ADDRESS=127.0.0.1:7999\n"
        "export LETHE_STORE_URL='postgresql+psycopg://lethe@127.0.0.1:5433/a b'\n"
        "export LETHE_CONTROL_QUEUE=\n"
        "LETHE_NOT_EXPORTED=1\n"
    )
    for name in ("LETHE_STORE_URL", "LETHE_CONTROL_QUEUE", "LETHE_NOT_EXPORTED"):
        monkeypatch.setenv(name, "")  # so that the test's end removes what the file sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("LETHE_TEMPORAL_ADDRESS", "127.0.0.1:7233")
    load_env_file(env)
    load_env_file(tmp_path / "missing")  # no file: nothing taken, no error
    assert os.environ["LETHE_TEMPORAL_ADDRESS"] == "127.0.0.1:7233"  # already set: kept
    assert os.environ["LETHE_STORE_URL"] == "postgresql+psycopg://lethe@127.0.0.1:5433/a b"
    assert os.environ["LETHE_CONTROL_QUEUE"] == ""
    assert "LETHE_NOT_EXPORTED" not in os.environ
