"""Benchmarks: python -m bench (report), pytest bench/ --benchmark-only (pytest-benchmark)."""
