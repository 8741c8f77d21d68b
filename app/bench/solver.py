"""``python -m app bench solver``: wall time of solving every Table 5 configuration."""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m app bench solver")
    p.add_argument("--repeats", type=int, default=5, help="cold solves (cache cleared) to time")
    args = p.parse_args(argv)

    from models.theory.solver import TABLE5, _solve_cached, solve

    configs = sorted({(r[1], r[2], r[3]) for r in TABLE5}, key=str)
    times = []
    for _ in range(args.repeats):
        _solve_cached.cache_clear()
        t0 = time.perf_counter()
        for name, eps, central in configs:
            solve(name, eps, central=central)
        times.append(time.perf_counter() - t0)
    print(f"solved {len(configs)} distinct Table 5 configurations ({len(TABLE5)} rows), cold "
          f"cache: median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms "
          f"over {args.repeats} runs (target: < 1000 ms)")
    return 0
