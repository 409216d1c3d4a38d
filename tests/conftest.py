"""Shared fixtures; each area keeps its own in tests/plugins/<area>.py."""

pytest_plugins = [
    "tests.plugins.s3",
    "tests.plugins.models",
    "tests.plugins.plane",
    "tests.plugins.postgres",
]
