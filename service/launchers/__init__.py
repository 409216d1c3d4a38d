"""Launchers start a job's container or process; the plane picks one by SFTOPS_LAUNCHER."""
