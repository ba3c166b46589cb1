"""The SDK's public face: `lethe.Client`."""

from __future__ import annotations


def test_the_sdk_client_is_lethe_client() -> None:
    import lethe
    from lethe.sdk.client import Client

    assert lethe.Client is Client
