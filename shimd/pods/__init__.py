"""Pod sandbox lifecycle."""
