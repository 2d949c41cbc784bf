"""Leases from Python: the context manager, the environment, the exceptions, and the lease
table shared with the gpuproc command."""

import multiprocessing
import os
import signal
import subprocess

import pytest

import gpuproc
from conftest import TIMEOUT, run_cli


def test_a_lease_is_a_context_manager_that_sets_and_restores_the_environment():
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
    try:
        with gpuproc.pick(2, min_free="10GiB") as lease:
            assert isinstance(lease, gpuproc.Lease)
            assert len(lease.indices) == 2 and 3 not in lease.indices  # 16 GiB free: qualifies
            assert lease.uuids == [d.uuid for d in lease.devices]
            assert lease.cuda_visible_devices == ",".join(lease.uuids)
            assert lease.env() == {
                "CUDA_VISIBLE_DEVICES": lease.cuda_visible_devices,
                "NVIDIA_VISIBLE_DEVICES": lease.cuda_visible_devices,
            }
            assert lease.apply() is lease
            assert os.environ["CUDA_VISIBLE_DEVICES"] == lease.cuda_visible_devices
            assert os.environ["NVIDIA_VISIBLE_DEVICES"] == lease.cuda_visible_devices
            # Children see it too: os.environ sets the process environment.
            child = subprocess.run(
                ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"],
                capture_output=True, text=True, timeout=TIMEOUT,
            )
            assert child.stdout.strip() == lease.cuda_visible_devices
            [info] = gpuproc.leases()
            assert info.id == lease.id and info.holders == [os.getpid()]
            assert [d.index for d in info.devices] == lease.indices
            assert repr(lease).startswith(f"Lease(id='{lease.id}', indices=")
            assert not lease.released
        assert lease.released
        assert gpuproc.leases() == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
        assert "NVIDIA_VISIBLE_DEVICES" not in os.environ
        lease.release()  # twice: nothing
        with pytest.raises(gpuproc.InvalidRequest, match="released"):
            lease.apply()
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)


def test_none_free_carries_each_gpus_reason_and_the_cli_message():
    with pytest.raises(gpuproc.NoneFree) as caught:
        gpuproc.pick(1, min_free="79.9GiB", max_utilization=50)
    e = caught.value
    assert isinstance(e, gpuproc.GpuError)
    assert e.needed == 1 and e.waited is None and e.kind is None
    assert [v.index for v in e.reasons] == [0, 1, 2, 3]
    assert [v.kind for v in e.reasons] == ["low_memory"] * 4
    assert e.reasons[3].reason == "15.5 GiB free, 79.9 GiB needed"
    assert e.reasons[3].permanent is False
    cli = run_cli(["pick", "--min-free", "79.9GiB", "--max-util", "50", "--for-pid", str(os.getpid())])
    assert cli.returncode == 3
    assert cli.stderr == f"gpuproc: {e}\n"

    with pytest.raises(gpuproc.NoneFree) as caught:
        gpuproc.pick(5, wait=30)  # impossible: fails at once, without waiting
    assert caught.value.impossible and caught.value.needed == 5
    assert "waiting cannot change that" in str(caught.value)


def test_a_pick_waits_and_says_how_long():
    with gpuproc.pick(devices=[2]):
        with pytest.raises(gpuproc.NoneFree) as caught:
            gpuproc.pick(devices=[2], wait=0.3)
    assert caught.value.waited >= 0.3
    assert "after waiting" in str(caught.value)
    [verdict] = [v for v in caught.value.reasons if v.index == 2]
    assert verdict.kind == "leased" and f"pid {os.getpid()}" in verdict.reason


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"min_free": "lots"}, ValueError, "expected a size such as 10GiB"),
        ({"min_free": -1}, ValueError, "-1 is not a number of bytes"),
        ({"min_free": True}, TypeError, "got a bool"),
        ({"min_free": 1.5}, TypeError, "got float"),
        ({"max_utilization": 101}, ValueError, "from 0 to 100"),
        ({"order": "fastest"}, ValueError, "unknown order"),
        ({"wait": -1.0}, ValueError, "not a duration"),
        ({"devices": [0, None]}, TypeError, "expected GPU indices"),
        ({"devices": ["zero"]}, ValueError, "is not a GPU"),
        ({"n": 0}, gpuproc.InvalidRequest, "zero GPUs"),
        ({"max_per_gpu": 0}, gpuproc.InvalidRequest, "share limit of zero"),
        ({"devices": [9]}, gpuproc.InvalidRequest, "9"),
    ],
)
def test_bad_requests_raise_before_anything_is_leased(kwargs, error, message):
    with pytest.raises(error, match=message):
        gpuproc.pick(**kwargs)
    assert gpuproc.leases() == []


def test_sizes_read_as_the_cli_reads_them():
    # 16609443840 bytes (15.5 GiB) free on GPU 3: "15G" = "15GiB" qualifies, "16.7GB"
    # (decimal) does not.
    free = gpuproc.devices()[3].memory.free
    assert free == 16609443840
    with gpuproc.pick(devices=[3], min_free="15G"):
        pass
    with gpuproc.pick(devices=[3], min_free=free):
        pass
    with pytest.raises(gpuproc.NoneFree):
        gpuproc.pick(devices=[3], min_free=free + 1)
    with pytest.raises(gpuproc.NoneFree):
        gpuproc.pick(devices=[3], min_free="16.7GB")
    with gpuproc.pick(devices="GPU-3d7b,1") as lease:
        assert sorted(lease.indices) == [1, 3]


def test_a_python_lease_blocks_the_same_gpu_for_gpuproc_pick_and_the_reverse():
    with gpuproc.pick(devices=[2]) as lease:
        cli = run_cli(["pick", "--devices", "2", "--for-pid", str(os.getpid())])
        assert cli.returncode == 3, cli.stderr
        assert f"GPU 2 ({lease.uuids[0]}): leased by pid {os.getpid()}" in cli.stderr
    # The reverse: a lease the command hands to a process of ours.
    holder = subprocess.Popen(["sleep", "300"])
    try:
        cli = run_cli(["pick", "--devices", "1", "--for-pid", str(holder.pid)])
        assert cli.returncode == 0, cli.stderr
        with pytest.raises(gpuproc.NoneFree) as caught:
            gpuproc.pick(devices=[1])
        [verdict] = [v for v in caught.value.reasons if v.index == 1]
        assert verdict.kind == "leased" and f"pid {holder.pid}" in verdict.reason
        assert cli.stdout.strip() == verdict.uuid
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    # Its holder is gone: the GPU is free again.
    with gpuproc.pick(devices=[1]):
        pass


def test_a_lease_held_by_gpuproc_pick_hold_blocks_python_until_the_command_ends():
    gpuproc_bin = gpuproc.find_gpuproc_bin()
    proc = subprocess.Popen(
        [gpuproc_bin, "pick", "--devices", "0", "--hold", "--", "sh", "-c", "echo held; read x || true"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        # The command runs only once it holds the lease.
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=TIMEOUT), "gpuproc pick --hold did not start the command"
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(gpuproc.NoneFree):
            gpuproc.pick(devices=[0])
        proc.stdin.close()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    with gpuproc.pick(devices=[0]):
        pass


def _release_inherited(lease, done):
    lease.release()
    done.put(lease.released)


def test_a_forked_child_releasing_an_inherited_lease_leaves_it_held():
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    with gpuproc.pick(devices=[1]) as lease:
        child = ctx.Process(target=_release_inherited, args=(lease, done))
        child.start()
        try:
            assert done.get(timeout=TIMEOUT) is True
            child.join(timeout=TIMEOUT)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=TIMEOUT)
        assert [info.id for info in gpuproc.leases()] == [lease.id]
        assert not lease.released


def test_a_lease_ends_when_its_object_is_collected():
    lease = gpuproc.pick()
    assert len(gpuproc.leases()) == 1
    del lease
    assert gpuproc.leases() == []


def test_a_waiting_pick_is_interrupted_by_a_signal_handler():
    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with gpuproc.pick(devices=[0]):
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Stop):
                gpuproc.pick(devices=[0], wait=TIMEOUT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
