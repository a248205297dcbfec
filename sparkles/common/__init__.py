"""Shared infrastructure: registry, configuration, paths, distributed helpers."""
