"""Python anchors for bench_channel: multiprocessing.Pipe round trips and Queue throughput.

Prints one JSON object: {"pipe_rtt_us": ..., "queue_mib_s": ...}.
Usage: python bench_channel.py ROUND_TRIPS MESSAGES MIB
"""
import json
import multiprocessing as mp
import sys
import time


def echo(conn, n):
    for _ in range(n):
        conn.send(conn.recv())


def producer(q, count, size):
    payload = bytes(size)
    for _ in range(count):
        q.put(payload)


def main():
    trips, messages, mib = (int(a) for a in sys.argv[1:4])
    mp.set_start_method("fork")
    a, b = mp.Pipe()
    p = mp.Process(target=echo, args=(b, trips + 100))
    p.start()
    for i in range(100):  # warm-up
        a.send(i)
        a.recv()
    t = time.perf_counter()
    for i in range(trips):
        a.send(i)
        a.recv()
    rtt = (time.perf_counter() - t) / trips
    p.join()

    size = mib << 20
    q = mp.Queue()
    p = mp.Process(target=producer, args=(q, messages + 1, size))
    p.start()
    q.get()  # warm-up
    t = time.perf_counter()
    for _ in range(messages):
        assert len(q.get()) == size
    elapsed = time.perf_counter() - t
    p.join()
    print(json.dumps({"pipe_rtt_us": rtt * 1e6, "queue_mib_s": messages * mib / elapsed}))


if __name__ == "__main__":
    main()
