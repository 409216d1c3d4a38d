"""The sftops control plane: a Flask REST API that stores jobs and launches them."""
