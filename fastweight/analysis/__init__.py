"""Analysis tools (G-effect)."""
