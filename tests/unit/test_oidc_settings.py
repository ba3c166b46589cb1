"""The console's OIDC settings: they go together, the secret never prints."""

from __future__ import annotations

import os

import pytest

from lethe.kernel.config import load_settings
from lethe.kernel.errors import ConfigurationError

ISSUER = {
    "LETHE_OIDC_ISSUER": "https://id.example.org",
    "LETHE_OIDC_AUDIENCE": "lethe",
    "LETHE_OIDC_JWKS_URL": "https://id.example.org/jwks",
}
SECRET = "s3cret-of-the-console"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LETHE_"):
            monkeypatch.delenv(name)


def _env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_the_code_flow_settings_load_and_the_secret_stays_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _env(
        monkeypatch,
        ISSUER
        | {
            "LETHE_OIDC_CLIENT_ID": "lethe-console",
            "LETHE_OIDC_CLIENT_SECRET": SECRET,
            "LETHE_OIDC_REDIRECT_URL": "https://lethe.example.org/console/oidc/callback",
            "LETHE_OIDC_SCOPES": "openid profile lethe",
        },
    )
    settings = load_settings()
    assert settings.oidc_client_id == "lethe-console"
    assert settings.oidc_client_secret is not None
    assert settings.oidc_client_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert settings.oidc_scopes.split() == ["openid", "profile", "lethe"]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"LETHE_OIDC_CLIENT_ID": "lethe-console"}, "LETHE_OIDC_ISSUER"),
        (ISSUER | {"LETHE_OIDC_CLIENT_SECRET": SECRET}, "LETHE_OIDC_CLIENT_ID"),
        (ISSUER | {"LETHE_OIDC_CLIENT_ID": "c", "LETHE_OIDC_SCOPES": "profile"}, "openid"),
        (ISSUER | {"LETHE_OIDC_REDIRECT_URL": "javascript:alert(1)"}, "oidc_redirect_url"),
    ],
)
def test_incomplete_or_bad_code_flow_settings_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], named: str
) -> None:
    _env(monkeypatch, values)
    with pytest.raises(ConfigurationError) as failed:
        load_settings()
    assert named.lower() in str(failed.value).lower()
    assert SECRET not in str(failed.value)
