"""Implementations of the breaker store contract in `partitioner.breaker.store`."""
