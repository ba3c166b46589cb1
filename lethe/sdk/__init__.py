"""The SDK for services: `lethe.Client` and key rotation."""
