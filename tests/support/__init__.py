"""Test helpers: an independent CRI client, daemon fixtures, image builders, registries."""
