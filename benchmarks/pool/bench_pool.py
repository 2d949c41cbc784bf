#!/usr/bin/env python3
"""Pool throughput, latency and memory in Python: the anchor for benchmarks/src/bin/bench_pool.rs.

With 2 workers (--processes) and the trivial task `x * x` it times, each after a warm-up
that is not counted:
- `multiprocessing.Pool.map(f, range(N1), chunksize=1)`,
- `concurrent.futures.ProcessPoolExecutor.map(f, range(N1), chunksize=1)` (consumed),
- loky's `get_reusable_executor(...).map(f, range(N1), chunksize=1)` (consumed; skipped
  when loky is not installed),
- `multiprocessing.Pool.map(f, range(N2))` with its automatic chunk size,
- `Pool.map(sleep_1ms, range(N3), chunksize=1)`,
- pool start: `Pool(2)` then `apply(f, (3,))` (first result), then `terminate()`, repeated;
- large payloads (--big-n > 0): `Pool.map` over --big-n numpy float32 arrays of --big-floats
  elements, returning the sum (`big_sum_*`) or the array times 2 (`big_times2_*`), each at
  chunksize 1 (`*_c1`) and the automatic chunk size (`*_auto`); and (--str-n > 0) `Pool.map`
  of `str.upper` over --str-n strings of --str-len bytes, automatic chunk size
  (`str_upper_auto`); needs numpy;
- idle worker memory: Rss and Pss of the pool's workers (from /proc/<pid>/smaps_rollup) after
  a warm-up map and a short idle pause.

Every pool uses the default start method (fork on Linux). Prints one JSON object on stdout:

    {"python": "3.11.7", "start_method": "fork", "results": [{"name": "...", "tasks": N,
     "seconds": S}, ...], "start_s": [...], "idle": [{"pid": P, "rss_kb": R, "pss_kb": Q}, ...]}

The two Pool.map rows are repeated --reps times (one result entry each), the str row
--str-reps times; the caller takes the median.

Usage: bench_pool.py [--processes P] [--n1 N] [--futures-n N] [--loky-n N] [--n2 N]
                     [--sleep-n N] [--starts K] [--reps R] [--big-n N] [--big-floats F]
                     [--str-n N] [--str-len L] [--str-reps R]
A count of 0 skips that measurement.
"""

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import platform
import sys
import time


def square(x):
    return x * x


def sleep_1ms(x):
    time.sleep(0.001)
    return x


def big_sum(a):
    return float(a.sum())


def big_times2(a):
    return a * 2


def upper(s):
    return s.upper()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def check(name, out, n):
    if len(out) != n or (n > 1 and out[-1] != (n - 1) * (n - 1)):
        raise SystemExit(f"{name}: wrong results")


def smaps(pid):
    rss = pss = -1
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    return {"pid": pid, "rss_kb": rss, "pss_kb": pss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--n1", type=int, default=100_000)
    ap.add_argument("--futures-n", type=int, default=None, help="defaults to --n1")
    ap.add_argument("--loky-n", type=int, default=None, help="defaults to --n1")
    ap.add_argument("--n2", type=int, default=1_000_000)
    ap.add_argument("--sleep-n", type=int, default=1000)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the two Pool.map rows")
    ap.add_argument(
        "--str-reps", type=int, default=None, help="repetitions of the str row (default: --reps)"
    )
    ap.add_argument("--big-n", type=int, default=0)
    ap.add_argument("--big-floats", type=int, default=1 << 20)
    ap.add_argument("--str-n", type=int, default=0)
    ap.add_argument("--str-len", type=int, default=100)
    args = ap.parse_args()
    procs = args.processes
    fut_n = args.n1 if args.futures_n is None else args.futures_n
    loky_n = args.n1 if args.loky_n is None else args.loky_n
    warm = 2000
    results = []
    idle = []
    start_s = []

    with mp.Pool(procs) as pool:
        pool.map(square, range(warm), chunksize=1)
        # Idle memory: after a warm-up map, with the workers waiting for work.
        time.sleep(0.3)
        idle = [smaps(p.pid) for p in pool._pool]
        if args.n1 > 0:
            for _ in range(args.reps):
                s, out = timed(lambda: pool.map(square, range(args.n1), chunksize=1))
                check("pool chunksize 1", out, args.n1)
                results.append({"name": "pool_c1", "tasks": args.n1, "seconds": s})
        if args.n2 > 0:
            pool.map(square, range(args.n2 // 10))
            for _ in range(args.reps):
                s, out = timed(lambda: pool.map(square, range(args.n2)))
                check("pool auto", out, args.n2)
                results.append({"name": "pool_auto", "tasks": args.n2, "seconds": s})
        if args.sleep_n > 0:
            pool.map(sleep_1ms, range(20), chunksize=1)
            s, out = timed(lambda: pool.map(sleep_1ms, range(args.sleep_n), chunksize=1))
            results.append({"name": "pool_sleep", "tasks": args.sleep_n, "seconds": s})
        if args.big_n > 0:
            import numpy as np

            data = [
                (np.arange(args.big_floats, dtype=np.int64) + i) % 7 for i in range(args.big_n)
            ]
            data = [a.astype(np.float32) for a in data]
            pool.map(big_sum, data[:4], chunksize=1)
            for name, fn in (("sum", big_sum), ("times2", big_times2)):
                for label, cs in (("c1", 1), ("auto", None)):
                    for _ in range(args.reps):
                        s, out = timed(lambda: pool.map(fn, data, chunksize=cs))
                        if len(out) != args.big_n:
                            raise SystemExit(f"big {name}: wrong results")
                        results.append(
                            {"name": f"big_{name}_{label}", "tasks": args.big_n, "seconds": s}
                        )
                        del out
            del data
        if args.str_n > 0:
            strings = [str(i).rjust(args.str_len, "a") for i in range(args.str_n)]
            pool.map(upper, strings[:1000])
            for _ in range(args.str_reps or args.reps):
                s, out = timed(lambda: pool.map(upper, strings))
                if out[-1] != strings[-1].upper():
                    raise SystemExit("str upper: wrong results")
                results.append({"name": "str_upper_auto", "tasks": args.str_n, "seconds": s})

    if fut_n > 0:
        with concurrent.futures.ProcessPoolExecutor(procs) as ex:
            list(ex.map(square, range(warm), chunksize=1))
            s, out = timed(lambda: list(ex.map(square, range(fut_n), chunksize=1)))
            check("futures chunksize 1", out, fut_n)
            results.append({"name": "futures_c1", "tasks": fut_n, "seconds": s})

    loky_version = None
    if loky_n > 0:
        try:
            import loky
        except ImportError:
            loky = None
        if loky is not None:
            loky_version = loky.__version__
            ex = loky.get_reusable_executor(max_workers=procs)
            list(ex.map(square, range(warm), chunksize=1))
            s, out = timed(lambda: list(ex.map(square, range(loky_n), chunksize=1)))
            check("loky chunksize 1", out, loky_n)
            results.append({"name": "loky_c1", "tasks": loky_n, "seconds": s})
            ex.shutdown(wait=True)

    for i in range(args.starts + 1 if args.starts > 0 else 0):
        t0 = time.perf_counter()
        pool = mp.Pool(procs)
        r = pool.apply(square, (3,))
        t = time.perf_counter() - t0
        pool.terminate()
        pool.join()
        if r != 9:
            raise SystemExit("pool start: wrong result")
        if i > 0:  # the first one is a warm-up
            start_s.append(t)

    json.dump(
        {
            "python": platform.python_version(),
            "start_method": mp.get_start_method(),
            "loky": loky_version,
            "results": results,
            "start_s": start_s,
            "idle": idle,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
