"""Activities: one module per system kind, each a plain connector plus thin activity wrappers."""
