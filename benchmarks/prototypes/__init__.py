"""Kernel prototypes measured by bench.py; none of them is used by the backend."""
