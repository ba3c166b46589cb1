"""The connection to Temporal: TLS from the settings, every payload encrypted by Lethe's codec."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client as TemporalClient
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from lethe.codec.converter import codec_from_settings, data_converter
from lethe.kernel.config import Settings
from lethe.kernel.errors import ServiceUnavailable


def _tls(settings: Settings) -> TLSConfig | bool:
    if not settings.temporal_tls:
        return False

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return TLSConfig(
        server_root_ca_cert=read(settings.temporal_tls_server_ca),
        client_cert=read(settings.temporal_tls_client_cert),
        client_private_key=read(settings.temporal_tls_client_key),
    )


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> TemporalClient:
    """A Temporal client that encrypts every payload with Lethe's codec."""
    converter = data_converter(await codec_from_settings(settings))
    try:
        return await TemporalClient.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=converter,
            tls=_tls(settings),
            runtime=runtime,
        )
    except RuntimeError as exc:
        raise ServiceUnavailable(
            f"cannot reach Temporal at {settings.temporal_address}: {exc}"
        ) from None
