"""Container lifecycle."""
