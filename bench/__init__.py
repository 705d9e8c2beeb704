"""Benchmarks of Partitioner against stock Celery, on the reference shop in `workers/`.

Each scenario is one command, e.g. `python -m bench.isolation --help`, and
`scripts/bench` runs them. Results are printed as markdown tables and written as JSON
to `bench/results/`.
"""
