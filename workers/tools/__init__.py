"""Tool bodies: one module per tool family."""
