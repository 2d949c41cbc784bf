"""Contended lock between two processes: Python's multiprocessing.Lock.

The same scenario as benchmarks/src/bin/bench_lock.rs: two processes meet at a barrier, then
each takes the lock N times, incrementing a shared counter inside it. Prints one JSON line.

Usage: python benchmarks/sync/lock.py [N]
"""

import json
import sys
import time
from multiprocessing import Barrier, Lock, Process, Queue, Value


def worker(lock, counter, barrier, n, q):
    barrier.wait(timeout=60)
    t = time.perf_counter()
    for _ in range(n):
        with lock:
            counter.value += 1
    q.put(time.perf_counter() - t)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    lock = Lock()
    counter = Value("Q", 0, lock=False)
    barrier = Barrier(2)
    q = Queue()
    procs = [Process(target=worker, args=(lock, counter, barrier, n, q)) for _ in range(2)]
    for p in procs:
        p.start()
    elapsed = max(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)

    # Uncontended: one process, acquire/release pairs.
    t = time.perf_counter()
    for _ in range(n):
        lock.acquire()
        lock.release()
    single = time.perf_counter() - t

    print(json.dumps({
        "contended_per_sec": 2 * n / elapsed,
        "uncontended_per_sec": n / single,
        "counter_ok": counter.value == 2 * n,
    }))


if __name__ == "__main__":
    main()
