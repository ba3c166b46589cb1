"""Lethe's settings, read from `LETHE_*` environment variables and validated once at start."""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lethe.kernel.errors import ConfigurationError

ENV_PREFIX = "LETHE_"
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
SECRET_KEY_BYTES = 32
CODEC_SERVER_TOKEN_MIN_CHARS = 32
_TOKEN = re.compile(r"^[!-~]+$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")

HostPort = Annotated[str, Field(pattern=_HOST_PORT.pattern)]


class Settings(BaseSettings):
    """Everything Lethe reads from its environment. Secrets stay `SecretStr` and never print."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    temporal_address: HostPort = "127.0.0.1:7233"
    temporal_namespace: str = Field(default="default", min_length=1)
    temporal_tls: bool = False
    temporal_tls_server_ca: Path | None = None
    temporal_tls_client_cert: Path | None = None
    temporal_tls_client_key: Path | None = None

    store_url: SecretStr = SecretStr("sqlite+aiosqlite:///.lethe/lethe.db")
    """SQLAlchemy URL of Lethe's own store (ledger, holds, forget-list)."""

    subject_key: SecretStr | None = None
    """Base64 of the 32-byte HMAC key that turns (tenant, subject id) into a subject reference."""

    datamap: Path | None = None
    """The data map (YAML): which systems hold personal data and where."""
    policy: Path | None = None
    """The policy pack (YAML): retention and erasure rules."""

    control_queue: str = Field(default="lethe-control", pattern=r"^[a-z][a-z0-9-]{0,62}$")
    """The control plane's task queue: the erasure workflow, planning, holds, ledger."""

    keys_master_key: SecretStr | None = None
    """Base64 of the 32-byte master key that seals the key service's KEKs (local provider)."""
    keys_store_url: SecretStr | None = None
    """SQLAlchemy URL of the key store (KEKs, data keys); Lethe's store when unset."""
    db_migrate: Literal["auto", "refuse"] = "auto"
    """On first use, `auto` brings Lethe's store and the key store to their schemas' heads;
    `refuse` stops with the command that does (`lethe db upgrade`) when one is behind."""
    keys_max_encryptions: int = Field(default=2**32, ge=1)
    """Encryptions under one data-key version before a new version rolls (NIST SP 800-38D)."""
    keys_cache_seconds: float = Field(default=60.0, ge=0)
    """How long a process keeps unwrapped data keys; a shredding elsewhere takes this long."""

    metrics_bind: HostPort | None = None
    """Where a worker serves Prometheus metrics, e.g. `127.0.0.1:9464`; off when unset."""
    worker_shutdown_grace_seconds: float = Field(default=30.0, gt=0)

    codec_server_tokens: SecretStr | None = None
    """Bearer tokens the codec server accepts, comma-separated, each 32 characters or more."""
    codec_server_origins: Annotated[tuple[str, ...], NoDecode] = ()
    """Browser origins (the Temporal UI's) the codec server answers, comma-separated."""
    codec_server_bind: HostPort = "127.0.0.1:8888"
    """Where `lethe codec-server` listens."""

    api_bind: HostPort = "127.0.0.1:8700"
    """Where `lethe serve` (the HTTP API and the console) listens."""
    api_store_url: SecretStr | None = None
    """SQLAlchemy URL of Lethe's store for the API: on PostgreSQL, a role without BYPASSRLS
    (`lethe db grant-api ROLE`), so row-level security keeps tenants apart. Else LETHE_STORE_URL."""
    api_public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    """The address people reach the API at (the OIDC callback's); the bind address when unset."""
    api_insecure_cookies: bool = False
    """Send the console's session cookie without `Secure` (only for http://localhost)."""
    api_session_key: SecretStr | None = None
    """Base64 of 32 bytes that sign the console's sessions; a fresh key per start when unset
    (sessions then end when the server restarts)."""
    oidc_issuer: str | None = None
    """The OpenID Connect issuer whose bearer tokens the API accepts (`iss`); off when unset."""
    oidc_audience: str | None = None
    """The audience (`aud`) those tokens must carry."""
    oidc_jwks_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """Where the issuer publishes its signing keys (JWKS)."""
    oidc_role_claim: str = "lethe_role"
    """The claim naming the principal's role: dpo, auditor, service or admin."""
    oidc_tenant_claim: str = "lethe_tenant"
    """The claim naming the principal's tenant (absent: all tenants, for auditor and admin)."""
    oidc_client_id: str | None = None
    """The console's client id at the issuer: set it to offer sign-in through OIDC (the
    authorization-code flow with PKCE; endpoints from the issuer's openid-configuration)."""
    oidc_client_secret: SecretStr | None = None
    """The console's client secret at the issuer (unset: a public client, PKCE only)."""
    oidc_redirect_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """Where the issuer sends the browser back: `<public url>/console/oidc/callback` when unset."""
    oidc_scopes: str = "openid"
    """The scopes the console asks for (space-separated; `openid` among them)."""

    @field_validator("store_url", "keys_store_url", "api_store_url")
    @classmethod
    def _store_url_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        try:
            make_url(value.get_secret_value())
        except ArgumentError:
            raise ValueError("is not a SQLAlchemy database URL") from None
        return value

    @field_validator(
        "temporal_tls_server_ca", "temporal_tls_client_cert", "temporal_tls_client_key"
    )
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("codec_server_tokens")
    @classmethod
    def _codec_server_tokens_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_tokens(value.get_secret_value())
        return value

    @field_validator("codec_server_origins", mode="before")
    @classmethod
    def _codec_server_origins_parse(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(filter(None, (o.strip() for o in value.split(","))))
        for origin in value if isinstance(value, (tuple, list)) else ():
            if not isinstance(origin, str) or not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{str(origin)[:80]!r} is not an origin: scheme://host[:port], no path or "
                    "trailing slash (e.g. http://localhost:8233)"
                )
        return value

    @field_validator("subject_key", "keys_master_key", "api_session_key")
    @classmethod
    def _key_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _decode_key(value.get_secret_value(), "the key")
        return value

    @field_validator("datamap", "policy")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        given = [self.oidc_issuer, self.oidc_audience, self.oidc_jwks_url]
        if any(given) and not all(given):
            raise ValueError(
                "LETHE_OIDC_ISSUER, LETHE_OIDC_AUDIENCE and LETHE_OIDC_JWKS_URL go together"
            )
        return self

    @model_validator(mode="after")
    def _oidc_login_complete(self) -> Settings:
        if self.oidc_client_id and not self.oidc_issuer:
            raise ValueError("LETHE_OIDC_CLIENT_ID needs LETHE_OIDC_ISSUER (and its JWKS URL)")
        if self.oidc_client_secret and not self.oidc_client_id:
            raise ValueError("LETHE_OIDC_CLIENT_SECRET needs LETHE_OIDC_CLIENT_ID")
        if self.oidc_client_id and "openid" not in self.oidc_scopes.split():
            raise ValueError("LETHE_OIDC_SCOPES must include openid")
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.temporal_tls_client_cert is None) != (self.temporal_tls_client_key is None):
            raise ValueError(
                "LETHE_TEMPORAL_TLS_CLIENT_CERT and LETHE_TEMPORAL_TLS_CLIENT_KEY go together"
            )
        return self

    @property
    def subject_key_bytes(self) -> bytes:
        """The HMAC key for subject references."""
        if self.subject_key is None:
            raise ConfigurationError(
                "LETHE_SUBJECT_KEY is not set: Lethe needs it to make subject references. "
                "Create one with `lethe codec new-secret` (any 32 random bytes, base64) and "
                "keep it: changing it changes every subject reference."
            )
        return _decode_key(self.subject_key.get_secret_value(), "the key")

    @property
    def keys_master_key_bytes(self) -> bytes:
        """The master key that seals the local KEK provider's key versions."""
        if self.keys_master_key is None:
            raise ConfigurationError(
                "LETHE_KEYS_MASTER_KEY is not set: the key service seals its key-encryption "
                "keys and the payload codec's keys with it. Create one with `lethe codec "
                "new-secret` (32 random bytes, base64) and keep it safe: without it no data key "
                "and no workflow payload can be opened."
            )
        return _decode_key(self.keys_master_key.get_secret_value(), "the key")

    @property
    def key_store_url(self) -> str:
        """Where the key store lives: LETHE_KEYS_STORE_URL, else Lethe's store."""
        return (self.keys_store_url or self.store_url).get_secret_value()

    @property
    def codec_server_token_values(self) -> tuple[str, ...]:
        """The bearer tokens the codec server accepts."""
        if self.codec_server_tokens is None:
            raise ConfigurationError(
                "LETHE_CODEC_SERVER_TOKENS is not set: the codec server decrypts payloads only "
                "for callers with a token. Create one with `lethe codec new-token` and export it."
            )
        return parse_tokens(self.codec_server_tokens.get_secret_value())


def parse_tokens(text: str) -> tuple[str, ...]:
    """Parse comma-separated bearer tokens; errors name the token's position, never the token."""
    tokens = tuple(filter(None, (t.strip() for t in text.split(","))))
    for position, token in enumerate(tokens, 1):
        if len(token) < CODEC_SERVER_TOKEN_MIN_CHARS:
            raise ValueError(
                f"token {position} is shorter than {CODEC_SERVER_TOKEN_MIN_CHARS} characters "
                "(make one with `lethe codec new-token`)"
            )
        if not _TOKEN.fullmatch(token):
            raise ValueError(
                f"token {position} holds a space or a character outside printable ASCII"
            )
    if not tokens:
        raise ValueError("holds no token")
    return tokens


def _decode_key(encoded: str, what: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not valid base64") from None
    if len(key) != SECRET_KEY_BYTES:
        raise ValueError(f"{what} must be {SECRET_KEY_BYTES} bytes, not {len(key)}")
    return key


def load_env_file(path: Path) -> None:
    """Take the `export NAME=value` lines (values shell-quoted) of `path` into the environment
    where it lacks them; no file, nothing taken. `scripts/stack up` writes `.stack/env` so."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if line.startswith("export ") and sep:
            os.environ.setdefault(name, (shlex.split(value) or [""])[0])


def load_settings() -> Settings:
    """Read the settings, or raise ConfigurationError naming each bad setting (never its value)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}")
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None


def current_settings() -> Settings:
    """The settings for the environment as it is now, read once per distinct LETHE_* state.

    Activities call this on every task; the environment rarely changes, so re-validating it
    each time is wasted work.
    """
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    return _settings_for(snapshot)


@lru_cache(maxsize=8)
def _settings_for(snapshot: tuple[tuple[str, str], ...]) -> Settings:
    return load_settings()


def connection(env_name: str) -> SecretStr:
    """The connection string held by the environment variable a data map names."""
    if not _ENV_NAME.fullmatch(env_name):
        raise ConfigurationError(
            "a connection must be the name of an environment variable (e.g. PATIENTS_DB_URL) "
            "that holds it, never the connection string itself"
        )
    value = os.environ.get(env_name)
    if not value:
        raise ConfigurationError(f"environment variable {env_name} is not set")
    return SecretStr(value)
