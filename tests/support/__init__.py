"""Shared test helpers: real services (hub, proxy, IdP, Slurm) started and stopped by PID."""
