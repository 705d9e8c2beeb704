"""Scenario "planner": what one plan of the supervisor's planner costs.

The planner (`partitioner.supervisor.plan`) runs once per control interval; its target is
under 5 ms per plan at 200 partitions. This builds random partitions (limits 1..8, backlog
0..500, a tenth halted by their breaker, budget three per partition), times `rounds` plans
of each size, and prints the median and worst time per plan. No broker is involved.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from bench.options import Option, parser
from partitioner.supervisor.plan import Demand, plan

TARGET_MS = 5.0
OPTIONS: list[Option] = [
    ("--sizes", str, "4,50,200,1000", "comma-separated partition counts"),
    ("--rounds", int, 200, "plans timed per size"),
    ("--seed", int, 1, "random seed"),
]
EPILOG = """\
example:
  scripts/bench planner
"""


def shop(size: int, rng: random.Random) -> tuple[list[Demand], int]:
    """`size` random partitions and a budget of three processes per partition."""
    demands = []
    for i in range(size):
        low = rng.randint(1, 2)
        high = rng.randint(low, 8)
        demands.append(
            Demand(f"p{i}", low, high, rng.randint(low, high), rng.randint(0, 500),
                   halted=rng.random() < 0.1)
        )  # fmt: skip
    return demands, 3 * size


def time_plans(demands: list[Demand], budget: int, rounds: int) -> list[float]:
    """Milliseconds of each of `rounds` plans."""
    took = []
    for _ in range(rounds):
        began = time.perf_counter()
        plan(demands, budget)
        took.append((time.perf_counter() - began) * 1000)
    return took


def main(argv: list[str] | None = None) -> int:
    args = parser("planner", __doc__, EPILOG, OPTIONS).parse_args(argv)
    rng = random.Random(args.seed)
    print("| partitions | median ms per plan | worst ms | target |")
    print("|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        took = time_plans(*shop(size, rng), args.rounds)
        target = f"< {TARGET_MS:g} ms: {'met' if max(took) < TARGET_MS else 'missed'}"
        shown = target if size == 200 else ""
        print(f"| {size} | {statistics.median(took):.3f} | {max(took):.3f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
