"""Benchmarks (`make bench` / `python -m bench.run`): side-by-side, alternating, medians.

Never timed in tests: tests/bench only checks that the harness runs in its smallest mode.
"""
