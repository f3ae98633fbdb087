"""Benchmarks (not part of the kdqa package): `python -m bench.performance`, `python bench/accuracy.py`."""
