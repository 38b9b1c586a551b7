"""The scaling benchmark (``benchmarks/bench_scaling.py``): its worker (what runs under
``horovodrun``), the cost model it compares with, and the rendering of its report."""
