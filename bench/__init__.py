"""Benchmarks (not part of the kdqa package), each a module run as `python -m bench.NAME` (bench/README.md);
what they share is in bench.common."""
