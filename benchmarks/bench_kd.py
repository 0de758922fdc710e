"""Benchmark of the fused distillation losses; the same as ``kdistill bench``.

Usage::

    .venv/bin/python benchmarks/bench_kd.py --json bench-results/bench.json
    .venv/bin/python benchmarks/bench_kd.py --quick --no-compile    # seconds, tiny sizes
"""

from kdistill.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
