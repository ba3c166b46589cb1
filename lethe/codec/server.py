"""Lethe's remote codec server: the Temporal UI and CLI decrypt payloads through it, by token.

It speaks Temporal's codec server protocol: `POST /encode` and `POST /decode` (also under a
`/{namespace}/` prefix, which the CLI's `--codec-endpoint` templating produces) with a body that
is the proto3 JSON of `temporal.api.common.v1.Payloads`. Each request needs a bearer token and
the configured namespace; browsers need an allowed origin. Logs carry no payload data or token.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiohttp import hdrs, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, SecretStr
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from lethe.codec.converter import codec_from_settings
from lethe.kernel.config import Settings
from lethe.kernel.errors import CodecError, ConfigurationError

MAX_BODY_BYTES = 4 * 1024 * 1024
ALLOW_HEADERS = "Content-Type, X-Namespace, Authorization"
ALLOW_METHODS = "POST, OPTIONS"
PREFLIGHT_MAX_AGE_SECONDS = 600
NAMESPACE_HEADER = "X-Namespace"
_OPERATION = "{operation:(?:encode|decode)}"
_PAYLOAD_COUNT = web.RequestKey("payload_count", int)
_HTTP_HINTS = {
    404: "no such endpoint: POST /encode or /decode, optionally under /{namespace}/",
    405: "the codec endpoints take POST (and OPTIONS for CORS preflight)",
}

log = logging.getLogger("lethe.codec.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CodecServerPolicy(BaseModel):
    """Whom the codec server answers: one namespace, holders of a token, browsers from origins."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    tokens: tuple[SecretStr, ...]
    origins: frozenset[str] = frozenset()

    def admits(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the tokens (compared in constant time)."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        given = presented.strip().encode()
        matches = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in self.tokens]
        return any(matches)


_CODEC = web.AppKey("codec", PayloadCodec)
_POLICY = web.AppKey("policy", CodecServerPolicy)


def policy_from_settings(settings: Settings) -> CodecServerPolicy:
    """The codec server's policy from the settings; ConfigurationError when no token is set."""
    return CodecServerPolicy(
        namespace=settings.temporal_namespace,
        tokens=tuple(SecretStr(t) for t in settings.codec_server_token_values),
        origins=frozenset(settings.codec_server_origins),
    )


async def app_from_settings(settings: Settings) -> web.Application:
    """The codec server for the key service's codec keys and the settings' namespace, tokens
    and origins."""
    policy = policy_from_settings(settings)
    return build_app(await codec_from_settings(settings), policy)


def build_app(codec: PayloadCodec, policy: CodecServerPolicy) -> web.Application:
    """An aiohttp application serving `codec` under `policy`."""
    if not policy.tokens:
        raise ConfigurationError("the codec server needs at least one token")
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[_CODEC] = codec
    app[_POLICY] = policy
    for path in (f"/{_OPERATION}", f"/{{namespace:[^/]+}}/{_OPERATION}"):
        app.router.add_post(path, _convert)
        app.router.add_route(hdrs.METH_OPTIONS, path, _preflight)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, bind: str) -> AsyncIterator[str]:
    """Serve `app` on `bind` (`host:port`; port 0 picks a free one) and yield its base URL."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    runner = web.AppRunner(app, access_log=None)  # the guard logs each request, without secrets
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, int(port)).start()
        except OSError as exc:
            raise ConfigurationError(
                f"the codec server cannot listen on {bind}: {exc.strerror or exc}"
            ) from None
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}"
    finally:
        await runner.cleanup()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign origins, turn every failure into a JSON error, add CORS, log the request."""
    started = time.perf_counter()
    policy = request.app[_POLICY]
    origin = request.headers.get(hdrs.ORIGIN)
    response: web.StreamResponse
    try:
        if origin is not None and origin not in policy.origins:
            response = _error(
                403,
                f"origin {origin[:200]!r} is not allowed: add it to LETHE_CODEC_SERVER_ORIGINS",
            )
        else:
            response = await handler(request)
    except web.HTTPException as exc:  # no such route, or a method other than POST and OPTIONS
        response = _error(exc.status, _HTTP_HINTS.get(exc.status, exc.reason))
        if hdrs.ALLOW in exc.headers:
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    except Exception as exc:  # the message could quote a payload: log only the type
        log.error("codec server: unexpected %s", type(exc).__name__)
        response = _error(500, "the codec server failed; see its log")
    response.headers[hdrs.VARY] = hdrs.ORIGIN
    if origin is not None and origin in policy.origins:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    log.info(
        "%s %s %d payloads=%d %.1fms",
        request.method,
        request.raw_path.partition("?")[0][:200],
        response.status,
        request.get(_PAYLOAD_COUNT, 0),
        (time.perf_counter() - started) * 1000,
    )
    return response


async def _preflight(request: web.Request) -> web.Response:
    """Answer a browser's CORS preflight; it carries no credentials, so none are asked for."""
    if hdrs.ORIGIN not in request.headers:
        return _error(403, "a preflight request needs an Origin header")
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
            hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_SECONDS),
        },
    )


async def _convert(request: web.Request) -> web.Response:
    """Encode or decode the posted payloads for a caller with a token, in our namespace."""
    policy = request.app[_POLICY]
    if not policy.admits(request.headers.get(hdrs.AUTHORIZATION)):
        return _error(
            401,
            "send `Authorization: Bearer <token>` with a token from LETHE_CODEC_SERVER_TOKENS",
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="lethe-codec-server"'},
        )
    refusal = _namespace_refusal(request, policy.namespace)
    if refusal is not None:
        return refusal
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(
            413, f"the body exceeds {MAX_BODY_BYTES} bytes: send fewer payloads per request"
        )
    try:
        payloads = _parse_payloads(body)
    except ValueError as exc:
        return _error(400, str(exc))
    request[_PAYLOAD_COUNT] = len(payloads)
    codec = request.app[_CODEC]
    operation = codec.encode if request.match_info["operation"] == "encode" else codec.decode
    try:
        converted = await operation(payloads)
    except CodecError as exc:
        return _error(400, str(exc))
    except DecodeError:
        return _error(400, "a payload decrypted to something that is not a Temporal payload")
    return web.json_response({"payloads": [json_format.MessageToDict(p) for p in converted]})


def _namespace_refusal(request: web.Request, namespace: str) -> web.Response | None:
    """A 400 when the request names no namespace, a 403 when it names another; else None."""
    named = [
        name
        for name in (request.headers.get(NAMESPACE_HEADER), request.match_info.get("namespace"))
        if name is not None
    ]
    if not named:
        return _error(
            400,
            f"name the namespace: send the {NAMESPACE_HEADER} header (the Temporal UI and CLI "
            "do) or post to /{namespace}/encode or /{namespace}/decode",
        )
    for name in named:
        if name != namespace:
            return _error(
                403,
                f"this codec server serves namespace {namespace!r} only, not {name[:100]!r}",
            )
    return None


def _parse_payloads(body: bytes) -> Sequence[Payload]:
    """The payloads of a proto3-JSON Payloads body; errors never quote the body."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError('the body must be a JSON object: {"payloads": [...]}')
    try:
        message = json_format.ParseDict(document, Payloads())
    except (json_format.ParseError, ValueError, TypeError):
        raise ValueError(
            'the body must be Temporal Payloads JSON: {"payloads": [{"metadata": {"name": '
            '"<base64>"}, "data": "<base64>"}]}'
        ) from None
    return list(message.payloads)


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
