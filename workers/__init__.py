"""The reference e-commerce system: order, payment, inventory and notification services.

The demo, the end-to-end tests and the benchmarks run it; read it as the template for
partitioning your own services.
"""
