"""The codec server over real HTTP on loopback: tokens, namespace, CORS, bad bodies, clean logs."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload

from lethe.codec.converter import ENCODING, EncryptionCodec
from lethe.codec.server import MAX_BODY_BYTES, CodecServerPolicy, build_app, policy_from_settings
from lethe.kernel.config import Settings, load_settings
from lethe.kernel.errors import ConfigurationError

TOKEN = "test-token-" + "t" * 40
OTHER_TOKEN = "other-token-" + "o" * 40
UI = "http://localhost:8233"
NAMESPACE = "default"
MARKER = "patient-ada-lovelace-1815"
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps({"note": MARKER}).encode())

Client = TestClient[Any, Any]


def _headers(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    headers = {"X-Namespace": NAMESPACE, **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _body(*payloads: Payload) -> dict[str, Any]:
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def _payloads(document: dict[str, Any]) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in document["payloads"]]


@pytest.fixture
async def client(test_codec: EncryptionCodec) -> AsyncIterator[Client]:
    """A client of the codec server, serving on a free loopback port."""
    policy = CodecServerPolicy(
        namespace=NAMESPACE,
        tokens=(SecretStr(TOKEN), SecretStr(OTHER_TOKEN)),
        origins=frozenset({UI}),
    )
    async with TestClient(TestServer(build_app(test_codec, policy))) as test_client:
        yield test_client


async def _sealed(client: Client) -> Payload:
    response = await client.post("/encode", json=_body(PLAIN), headers=_headers())
    assert response.status == 200
    [sealed] = _payloads(await response.json())
    return sealed


async def test_encode_then_decode_round_trips(client: Client) -> None:
    sealed = await _sealed(client)
    assert sealed.metadata["encoding"] == ENCODING
    assert MARKER.encode() not in sealed.data

    response = await client.post("/decode", json=_body(sealed), headers=_headers(OTHER_TOKEN))
    assert response.status == 200
    assert _payloads(await response.json()) == [PLAIN]


async def test_the_cli_namespace_prefixed_path_works(client: Client) -> None:
    sealed = await _sealed(client)
    response = await client.post(f"/{NAMESPACE}/decode", json=_body(sealed), headers=_headers())
    assert response.status == 200
    assert _payloads(await response.json()) == [PLAIN]


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {TOKEN[:-1]}x", "Bearer " + "w" * 52, f"Basic {TOKEN}", TOKEN, "Bearer "],
)
async def test_a_missing_or_wrong_token_is_401(client: Client, authorization: str | None) -> None:
    headers = _headers(None)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = await client.post("/decode", json=_body(PLAIN), headers=headers)
    assert response.status == 401
    assert "LETHE_CODEC_SERVER_TOKENS" in (await response.json())["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_preflight_from_an_allowed_origin_needs_no_token(client: Client) -> None:
    response = await client.options(
        "/decode",
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == UI
    assert response.headers["Vary"] == "Origin"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "Content-Type, X-Namespace, Authorization"
    )


async def test_preflight_from_another_origin_is_403_without_cors(client: Client) -> None:
    response = await client.options(
        "/decode",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 403
    assert "LETHE_CODEC_SERVER_ORIGINS" in (await response.json())["error"]
    assert not any(name.startswith("Access-Control-") for name in response.headers)


async def test_a_post_from_an_allowed_origin_gets_cors_headers(client: Client) -> None:
    sealed = await _sealed(client)
    response = await client.post("/decode", json=_body(sealed), headers=_headers(Origin=UI))
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == UI
    refused = await client.post(
        "/decode", json=_body(sealed), headers=_headers(Origin="https://evil.example")
    )
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers


async def test_another_namespace_is_refused(client: Client) -> None:
    sealed = await _sealed(client)
    by_header = await client.post(
        "/decode", json=_body(sealed), headers={**_headers(), "X-Namespace": "other"}
    )
    assert by_header.status == 403
    assert "serves namespace 'default' only" in (await by_header.json())["error"]
    by_path = await client.post("/other/decode", json=_body(sealed), headers=_headers())
    assert by_path.status == 403
    unnamed = await client.post(
        "/decode", json=_body(sealed), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert unnamed.status == 400
    assert "X-Namespace" in (await unnamed.json())["error"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not JSON"),
        (b'["payloads"]', "JSON object"),
        (b'{"payloads": [{"data": "abcde"}]}', "base64"),
        (b'{"payloads": [{"data": 12}]}', "base64"),
        (b'{"payloads": [{"unknown": "x"}]}', "Temporal Payloads JSON"),
    ],
)
async def test_a_malformed_body_is_400(client: Client, body: bytes, expected: str) -> None:
    response = await client.post("/decode", data=body, headers=_headers())
    assert response.status == 400
    assert expected in (await response.json())["error"]


async def test_a_tampered_payload_is_400_without_its_content(client: Client) -> None:
    sealed = await _sealed(client)
    tampered = Payload(metadata=dict(sealed.metadata), data=sealed.data[:-1] + b"\x00")
    body = _body(tampered)
    response = await client.post("/decode", json=body, headers=_headers())
    assert response.status == 400
    text = await response.text()
    assert "failed authentication" in text
    assert body["payloads"][0]["data"] not in text
    assert MARKER not in text


async def test_a_body_over_the_limit_is_413(client: Client) -> None:
    huge = base64.b64encode(b"x" * MAX_BODY_BYTES).decode()
    response = await client.post(
        "/encode", data=f'{{"payloads": [{{"data": "{huge}"}}]}}', headers=_headers()
    )
    assert response.status == 413
    assert "exceeds" in (await response.json())["error"]


async def test_unknown_paths_and_methods_are_json_errors(client: Client) -> None:
    missing = await client.post("/transcode", json={}, headers=_headers())
    assert missing.status == 404
    assert "POST /encode or /decode" in (await missing.json())["error"]
    wrong_method = await client.get("/decode", headers=_headers())
    assert wrong_method.status == 405


async def test_logs_name_each_request_but_never_its_data_or_token(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sealed = await _sealed(client)
    await client.post("/decode", json=_body(sealed, sealed), headers=_headers())
    await client.post("/decode", json=_body(PLAIN), headers=_headers("nope" * 10))
    tampered = Payload(metadata=dict(sealed.metadata), data=sealed.data[:-1] + b"\x00")
    await client.post("/decode", json=_body(tampered), headers=_headers())

    lines = [r.getMessage() for r in caplog.records if r.name == "lethe.codec.server"]
    assert any(line.startswith("POST /decode 200 payloads=2 ") for line in lines)
    assert any(line.startswith("POST /decode 401 payloads=0 ") for line in lines)
    assert any(line.startswith("POST /decode 400 payloads=1 ") for line in lines)
    everything = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (
        MARKER,
        base64.b64encode(PLAIN.data).decode(),
        base64.b64encode(sealed.data).decode(),
        TOKEN,
        "nope" * 10,
    ):
        assert secret not in everything


def test_the_server_refuses_to_start_without_a_token() -> None:
    with pytest.raises(ConfigurationError, match=r"LETHE_CODEC_SERVER_TOKENS.*new-token"):
        policy_from_settings(Settings(codec_server_tokens=None))


@pytest.mark.parametrize(
    ("tokens", "problem"),
    [("short-secret-token", "token 1 is shorter than 32"), (f"{TOKEN}, x{TOKEN}é", "token 2")],
)
def test_a_bad_token_is_named_by_position_never_printed(tokens: str, problem: str) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LETHE_CODEC_SERVER_TOKENS", tokens)
        with pytest.raises(ConfigurationError, match=problem) as caught:
            load_settings()
    assert "short-secret-token" not in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_origins_are_comma_separated_and_must_be_bare() -> None:
    settings = Settings(codec_server_origins=f"{UI}, http://127.0.0.1:8233")
    assert settings.codec_server_origins == (UI, "http://127.0.0.1:8233")
    with pytest.raises(ValueError, match="not an origin"):
        Settings(codec_server_origins="http://localhost:8233/")
