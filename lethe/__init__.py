"""Lethe: durable right-to-erasure, retention and key-management workflows."""

__version__ = "0.1.0"
