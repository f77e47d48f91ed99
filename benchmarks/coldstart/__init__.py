"""Container cold start vs image size, Nydus beside OCI, in containerd: ``python -m benchmarks.coldstart``
(:mod:`benchmarks.coldstart.__main__` says how); benchmarks/bench_coldstart.py runs it in ``--quick`` mode."""
