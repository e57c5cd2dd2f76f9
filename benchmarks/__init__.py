"""Benchmarks of scalselect-fast: `python -m benchmarks` runs them and writes BENCHMARKS.md."""
