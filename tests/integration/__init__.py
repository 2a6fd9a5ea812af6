"""Integration tests: real processes, real mounts."""
