"""Managed dict: Python's multiprocessing.Manager().dict().

The same scenario as benchmarks/src/bin/bench_managers.rs: N get/set pairs from one client
(this process), then N from each of 4 client processes at once. Prints one JSON line.

Usage: python benchmarks/managers/managed_dict.py [N]
"""

import json
import sys
import time
from multiprocessing import Barrier, Manager, Process, Queue


def pairs(d, base, n):
    for i in range(n):
        d[base + i % 1000] = i
        d.get(base + i % 1000)


def client(d, base, n, barrier, q):
    barrier.wait(timeout=60)
    t = time.perf_counter()
    pairs(d, base, n)
    q.put(time.perf_counter() - t)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with Manager() as m:
        d = m.dict()
        t = time.perf_counter()
        pairs(d, 0, n)
        one = time.perf_counter() - t

        barrier = Barrier(4)
        q = Queue()
        procs = [Process(target=client, args=(d, k * 1000, n, barrier, q)) for k in range(4)]
        for p in procs:
            p.start()
        four = max(q.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        ok = len(d) == 4000
    print(json.dumps({
        "one_client_pairs_per_sec": n / one,
        "four_clients_pairs_per_sec": 4 * n / four,
        "ok": ok,
    }))


if __name__ == "__main__":
    main()
