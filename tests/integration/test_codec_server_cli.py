"""The real `temporal` CLI reads a Lethe workflow's history through the codec server, by token."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import Client as TemporalClient

from lethe.codec.server import app_from_settings, serving
from lethe.contracts import HealthCheckRequest
from lethe.kernel.config import Settings
from lethe.workflows.healthcheck import HealthCheckWorkflow

MARKER = "patient-grace-hopper-1906"
TOKEN = "integration-" + "k" * 40
TEMPORAL_CLI = Path(sys.executable).parent / "temporal"


@pytest.fixture
async def workflow_id(stack_temporal: TemporalClient) -> AsyncIterator[str]:
    """A workflow whose input holds the marker; no worker runs it, and it is terminated after."""
    workflow_id = f"codec-server-{uuid.uuid4()}"
    handle = await stack_temporal.start_workflow(
        HealthCheckWorkflow.run,
        HealthCheckRequest(token=MARKER),
        id=workflow_id,
        task_queue=f"lethe-codec-server-{uuid.uuid4().hex[:12]}",
    )
    try:
        yield workflow_id
    finally:
        await handle.terminate(reason="codec server test done")


@pytest.fixture
async def codec_url(settings: Settings) -> AsyncIterator[str]:
    """The codec server, in this process, on a free loopback port."""
    configured = settings.model_copy(update={"codec_server_tokens": SecretStr(TOKEN)})
    async with serving(await app_from_settings(configured), "127.0.0.1:0") as url:
        yield url


async def _show(settings: Settings, workflow_id: str, *codec_options: str) -> tuple[int, str]:
    """Run `temporal workflow show -o json`; the exit code and everything it printed."""
    if not TEMPORAL_CLI.is_file():
        pytest.fail(f"{TEMPORAL_CLI} is missing: run `scripts/stack install-python`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    process = await asyncio.create_subprocess_exec(
        str(TEMPORAL_CLI),
        "workflow",
        "show",
        "--workflow-id",
        workflow_id,
        "--address",
        settings.temporal_address,
        "--namespace",
        settings.temporal_namespace,
        "--disable-config-file",
        "--disable-config-env",
        "--command-timeout",
        "5s",
        "--output",
        "json",
        *codec_options,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode() + stderr.decode()


def _payload_data(document: Any) -> Iterator[bytes]:
    """Every payload's data in a history printed as proto3 JSON."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "payloads" and isinstance(value, list):
                yield from (base64.b64decode(p.get("data", "")) for p in value)
            else:
                yield from _payload_data(value)
    elif isinstance(document, list):
        for item in document:
            yield from _payload_data(item)


async def test_the_cli_decrypts_history_through_the_codec_server(
    settings: Settings, workflow_id: str, codec_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lethe.codec.server")
    code, output = await _show(
        settings,
        workflow_id,
        "--codec-endpoint",
        codec_url,
        "--codec-auth",
        f"Bearer {TOKEN}",
    )
    assert code == 0, output
    assert any(MARKER.encode() in data for data in _payload_data(json.loads(output)))
    assert any(m.startswith("POST /decode 200 ") for m in caplog.messages)
    assert TOKEN not in caplog.text
    assert MARKER not in caplog.text


async def test_the_cli_namespace_template_reaches_the_server(
    settings: Settings, workflow_id: str, codec_url: str
) -> None:
    code, output = await _show(
        settings,
        workflow_id,
        "--codec-endpoint",
        codec_url + "/{namespace}",
        "--codec-auth",
        f"Bearer {TOKEN}",
    )
    assert code == 0, output
    assert any(MARKER.encode() in data for data in _payload_data(json.loads(output)))


async def test_without_a_token_the_cli_gets_no_plaintext(
    settings: Settings, workflow_id: str, codec_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lethe.codec.server")
    code, output = await _show(settings, workflow_id, "--codec-endpoint", codec_url)
    assert MARKER not in output
    assert base64.b64encode(MARKER.encode()).decode() not in output
    if code == 0:  # a CLI that shows what it could not decode must show only ciphertext
        assert not any(MARKER.encode() in data for data in _payload_data(json.loads(output)))
    assert any(m.startswith("POST /decode 401 ") for m in caplog.messages)
