"""The prioritized-SGD benchmark (``benchmarks/bench_prioritized.py``): the time-to-target
harness its workers run and the rendering of its report."""
