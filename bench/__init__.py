"""Benchmarks for throttle: `python -m bench.gate` (the Redis gate); see bench/README.md."""
