"""worker_gpus() in Python's own process pools: each worker leases its GPUs for its life,
and a worker killed with SIGKILL frees them."""

import concurrent.futures
import functools
import multiprocessing
import os
import select
import signal
from collections import Counter

import pytest

import gpuproc
from conftest import TIMEOUT, bounded


_stop_fd = _report = None


def _init(report, stop_fd):
    global _stop_fd, _report
    _stop_fd, _report = stop_fd, report
    lease = gpuproc.worker_gpus(1, max_per_gpu=2)
    report.put(("started", os.getpid(), lease.indices[0], os.environ["CUDA_VISIBLE_DEVICES"]))


def _where_am_i(_):
    lease = gpuproc.worker_lease()
    return os.getpid(), lease.indices[0], os.environ["CUDA_VISIBLE_DEVICES"]


def _busy(_):
    """A task that says which worker runs it, then waits until the test's pipe is readable."""
    _report.put(("busy", os.getpid()))
    select.select([_stop_fd], [], [], TIMEOUT)
    return os.getpid()


def test_eight_pool_workers_sharing_four_gpus_land_two_per_gpu_and_a_killed_one_frees_its_gpu():
    ctx = multiprocessing.get_context("fork")
    report = ctx.Queue()
    stop_r, stop_w = os.pipe()
    pool = ctx.Pool(8, initializer=_init, initargs=(report, stop_r))
    try:
        started = [report.get(timeout=TIMEOUT) for _ in range(8)]
        gpu_of = {pid: index for _, pid, index, _ in started}
        assert len(gpu_of) == 8
        assert Counter(gpu_of.values()) == {0: 2, 1: 2, 2: 2, 3: 2}
        uuids = [d.uuid for d in gpuproc.devices(processes=False)]
        assert all(env == uuids[index] for _, _, index, env in started)
        # Tasks run with their worker's GPU.
        seen = pool.map_async(_where_am_i, range(32), chunksize=1).get(timeout=TIMEOUT)
        assert all(gpu_of[pid] == index for pid, index, _ in seen)
        assert sorted(len(l.holders) for l in gpuproc.leases()) == [1] * 8
        # Every worker busy with a task of its own, so that none is inside the pool's task
        # queue (killing a worker that waits there holding the queue's lock breaks
        # multiprocessing.Pool itself).
        pool.map_async(_busy, range(8), chunksize=1)
        busy = {report.get(timeout=TIMEOUT) for _ in range(8)}
        assert busy == {("busy", pid) for pid in gpu_of}
        # Every GPU is full (two leases each), so the replacement of a killed worker starts
        # only if the dead worker's lease is gone: it takes that worker's GPU.
        victim = started[0][1]
        os.kill(victim, signal.SIGKILL)
        what, pid, index, _ = report.get(timeout=TIMEOUT)
        assert what == "started" and pid != victim and index == gpu_of[victim]
        assert Counter(info.devices[0].index for info in gpuproc.leases()) == {0: 2, 1: 2, 2: 2, 3: 2}
        with pytest.raises(gpuproc.NoneFree):
            gpuproc.pick(max_per_gpu=2)
    finally:
        os.write(stop_w, b"x")  # the busy tasks end
        pool.terminate()
        bounded(pool.join)
        os.close(stop_r)
        os.close(stop_w)
    assert gpuproc.leases() == []


def test_process_pool_executor_workers_get_a_gpu_each():
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=4, mp_context=ctx, initializer=gpuproc.worker_gpus, initargs=(1,)
    )
    try:
        getenv = functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES")
        futures = [pool.submit(getenv) for _ in range(16)]
        values = {f.result(timeout=TIMEOUT) for f in futures}
        leases = gpuproc.leases()
        assert len(leases) == len({l.holders[0] for l in leases})  # one lease per worker
        assert values <= {l.devices[0].uuid for l in leases}
        assert all(len(l.devices) == 1 and l.max_per_gpu == 1 for l in leases)
    finally:
        bounded(lambda: pool.shutdown(wait=True, cancel_futures=True))
    assert gpuproc.leases() == []


def _hold_gpu(report, stop):
    lease = gpuproc.worker_gpus(1, devices=[3])
    # A second call in the same process returns the same lease.
    assert gpuproc.worker_gpus(1, devices=[3]) is lease is gpuproc.worker_lease()
    report.put(lease.indices)
    stop.poll(TIMEOUT)


def test_a_worker_killed_with_sigkill_frees_its_gpu():
    ctx = multiprocessing.get_context("fork")
    # The worker waits on a pipe, not on an Event: an Event's waiter killed inside wait()
    # leaves its condition broken.
    report = ctx.Queue()
    stop, _keep_open = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_hold_gpu, args=(report, stop))
    worker.start()
    try:
        assert report.get(timeout=TIMEOUT) == [3]
        with pytest.raises(gpuproc.NoneFree) as caught:
            gpuproc.pick(devices=[3])
        assert f"leased by pid {worker.pid}" in str(caught.value)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=TIMEOUT)
        assert worker.exitcode == -signal.SIGKILL
        with gpuproc.pick(devices=[3]) as lease:
            assert lease.indices == [3]
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=TIMEOUT)


def test_worker_gpus_refuses_a_second_different_request_in_one_process():
    ctx = multiprocessing.get_context("fork")
    report = ctx.Queue()
    worker = ctx.Process(target=_second_request, args=(report,))
    worker.start()
    try:
        assert report.get(timeout=TIMEOUT).startswith("this process already called worker_gpus()")
        worker.join(timeout=TIMEOUT)
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=TIMEOUT)
    assert gpuproc.worker_lease() is None  # this process took none


def _second_request(report):
    gpuproc.worker_gpus(1)
    try:
        gpuproc.worker_gpus(2)
    except gpuproc.InvalidRequest as e:
        report.put(str(e))
