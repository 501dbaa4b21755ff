"""Fixtures of the operator tests: the operator subprocess and a fake trainer metrics endpoint."""

from operator_harness import fake_metrics, operator

__all__ = ["fake_metrics", "operator"]
