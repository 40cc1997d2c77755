"""Built-in passes. Each is discovered through the ``graphkd.passes`` entry point group,
exactly like a user's plugin pass; importing this package registers nothing by itself."""
