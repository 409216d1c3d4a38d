"""Fixtures for the postgres area (filled in by its owner)."""
