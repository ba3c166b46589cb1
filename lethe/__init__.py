"""Lethe: durable right-to-erasure, retention and key-management workflows.

`lethe.Client` is the SDK for services (see `lethe.sdk.client`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lethe.sdk.client import Client

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import lethe.kernel.config` stays light.
    if name == "Client":
        from lethe.sdk.client import Client

        return Client
    raise AttributeError(f"module 'lethe' has no attribute {name!r}")
