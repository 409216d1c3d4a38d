"""Fixtures for the models area (filled in by its owner)."""
