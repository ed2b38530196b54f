"""The benchmarks' shared harness and their experiments, one module each (issue 9).

Run them through scripts/bench_*.py."""
