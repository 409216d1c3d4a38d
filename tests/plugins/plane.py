"""Fixtures for the plane area (filled in by its owner)."""
