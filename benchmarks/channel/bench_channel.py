"""Python anchors for bench_channel: multiprocessing.Pipe round trips and Queue throughput.

Measured like the Rust side: the same messages (a small int echoed back; the same-sized
bytes payload), the same warm-up, and the median of ROUNDS timed rounds.

Prints one JSON object: {"pipe_rtt_us": ..., "queue_mib_s": ...}.
Usage: python bench_channel.py ROUND_TRIPS MESSAGES MIB [ROUNDS]
"""
import json
import multiprocessing as mp
import statistics
import sys
import time

WARM_UP = 100


def echo(conn, n):
    for _ in range(n):
        conn.send(conn.recv())


def producer(q, count, size):
    payload = bytes(size)
    for _ in range(count):
        q.put(payload)


def main():
    trips, messages, mib = (int(a) for a in sys.argv[1:4])
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    mp.set_start_method("fork")

    per_round = max(trips // rounds, 1)
    a, b = mp.Pipe()
    p = mp.Process(target=echo, args=(b, per_round * rounds + WARM_UP))
    p.start()
    for i in range(WARM_UP):
        a.send(i)
        a.recv()
    rtts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(per_round):
            a.send(i)
            back = a.recv()
            assert back == i
        rtts.append((time.perf_counter() - t) / per_round)
    p.join()

    size = mib << 20
    per_round = max(messages // rounds, 1)
    q = mp.Queue()
    p = mp.Process(target=producer, args=(q, per_round * rounds + 1, size))
    p.start()
    q.get()  # warm-up
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            assert len(q.get()) == size
        rates.append(per_round * mib / (time.perf_counter() - t))
    p.join()
    print(json.dumps({
        "pipe_rtt_us": statistics.median(rtts) * 1e6,
        "queue_mib_s": statistics.median(rates),
    }))


if __name__ == "__main__":
    main()
