"""Benchmark harness of curvlinops_fisher (run ``python benchmarks/run.py --help``)."""
