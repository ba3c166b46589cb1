"""Policies: retention and erasure rules, and the engine that applies them."""
