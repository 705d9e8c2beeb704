"""The supervisor: observe the partitions, plan their concurrency, and act on the plan."""
