"""Benchmarks of Partitioner: against stock Celery on the reference shop in `workers/`
(`isolation`), its breaker against pybreaker's, shared through Redis (`breakers`), a
failing partition with its breaker on and off (`failing`), and what routing and the
producer gate cost a publisher (`publish`).

Each scenario is one command, e.g. `python -m bench.isolation --help`, and
`scripts/bench [SCENARIO]` runs them. Results are printed as markdown tables and
written as JSON to `bench/results/`.
"""
