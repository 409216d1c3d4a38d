"""The sftops batch job: pull, prepare, train, verify, export. Entry point: `python -m job`."""
