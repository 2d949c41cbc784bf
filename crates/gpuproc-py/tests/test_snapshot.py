"""The GPU information Python sees equals what the gpuproc command reports."""

import copy
import json
import os
import pickle
import subprocess

import pytest

import gpuproc
from conftest import TIMEOUT, bounded, run_cli, run_python


def normalized(snapshot, own_pid):
    """A snapshot dict without what differs between two queries: the time, the energy
    counter (it counts on between them: only its presence is compared), CPU and RSS
    figures, and the querying process itself (the simulator's pid "self")."""
    d = copy.deepcopy(snapshot)
    d.pop("timestamp_ms")
    for device in d["devices"]:
        if device.get("total_energy_mj") is not None:
            device["total_energy_mj"] = "counting"
        if device["processes"] is None:
            continue
        device["processes"] = [p for p in device["processes"] if p["nvml_pid"] != own_pid]
        for p in device["processes"]:
            # Per-process samples move between two queries: only their presence counts.
            if p.get("utilization") is not None:
                p["utilization"] = "sampled"
            if p["host"]:
                p["host"]["cpu_percent"] = None
                p["host"]["rss_bytes"] = None
    return d


def cli_snapshot(scenario):
    """`gpuproc gpus --json` on `scenario`, and the command's pid."""
    env = {**os.environ, "NVML_SIM_SCENARIO": scenario}
    proc = subprocess.Popen(
        [gpuproc.find_gpuproc_bin(), "gpus", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return json.loads(out), proc.pid


def test_snapshot_equals_the_cli_json():
    cli, cli_pid = cli_snapshot("4gpu")
    mine = gpuproc.snapshot().to_dict()
    assert normalized(mine, os.getpid()) == normalized(cli, cli_pid)
    assert len(mine["devices"]) == 4


@pytest.mark.parametrize("scenario", ["8gpu", "mig", "lost"])
def test_snapshot_equals_the_cli_json_on_other_scenarios(scenario):
    out = run_python(
        "import gpuproc, json, os; print(json.dumps({'pid': os.getpid(), "
        "'snapshot': gpuproc.snapshot().to_dict()}))",
        scenario,
    )
    mine = json.loads(out)
    cli, cli_pid = cli_snapshot(scenario)
    assert normalized(mine["snapshot"], mine["pid"]) == normalized(cli, cli_pid)
    if scenario == "8gpu":
        # The child itself is the simulator's "self" process on GPU 1.
        on_gpu1 = [p["nvml_pid"] for p in mine["snapshot"]["devices"][1]["processes"]]
        assert mine["pid"] in on_gpu1


def test_records_are_typed_frozen_and_plain_as_dicts():
    snap = gpuproc.snapshot()
    assert isinstance(snap, gpuproc.Snapshot)
    device = snap.devices[3]
    assert isinstance(device, gpuproc.Device)
    assert isinstance(device.memory, gpuproc.Memory)
    assert device.memory.total == 80 << 30
    assert device.memory.used == 64 << 30
    assert device.utilization.gpu == 98
    assert device.uuid == "GPU-3d7b5b94-6f4e-4a5b-8c33-4e5f60718293"
    assert snap.driver_version == "550.54.15"
    assert (snap.cuda_driver_version.major, snap.cuda_driver_version.minor) == (12, 4)
    with pytest.raises(AttributeError):
        device.index = 7
    # to_dict is plain data, ready for json.
    assert json.loads(json.dumps(snap.to_dict())) == snap.to_dict()
    free = device.memory.free
    assert 0 < free < 16 << 30
    assert repr(device.memory) == f"Memory(total={80 << 30}, used={64 << 30}, free={free})"
    assert repr(device).startswith("Device(index=3, name='NVIDIA H100 80GB HBM3', uuid=")
    assert device == pickle.loads(pickle.dumps(device))
    assert device != snap.devices[2]
    assert device != "a string"


# What only snapshot() reads (devices() is the quick read that picking GPUs uses).
DETAILS = (
    "encoder_utilization", "decoder_utilization", "pcie", "nvlink", "bar1_memory",
    "clock_event_reasons", "retired_pages", "remapped_rows", "total_energy_mj",
)


def test_devices_and_device_count_agree_with_the_snapshot():
    snap = gpuproc.snapshot().to_dict()["devices"]
    for d in snap:
        for key in DETAILS:
            d[key] = None
        for p in d["processes"] or []:
            p["utilization"] = None
    assert [d.to_dict() for d in gpuproc.devices()] == snap
    assert gpuproc.device_count() == 4
    bare = gpuproc.devices(processes=False)
    assert all(d.processes is None for d in bare)
    assert [d.uuid for d in bare] == [d["uuid"] for d in snap]


def test_usage_of_counts_the_process_and_its_descendants():
    out = run_python(
        "import gpuproc, json, os; u = gpuproc.usage_of(os.getpid()); "
        "v = gpuproc.usage_of(os.getpid(), descendants=False); "
        "print(json.dumps({'pid': os.getpid(), 'u': u.to_dict(), 'v': v.to_dict(), "
        "'repr': repr(u)}))",
        "8gpu",
    )
    got = json.loads(out)
    usage = got["u"]
    assert usage["pid"] == got["pid"]
    assert [d["index"] for d in usage["devices"]] == [1]
    assert usage["devices"][0]["pids"] == [got["pid"]]
    assert usage["total_memory"] == usage["devices"][0]["used_memory"] > 0
    assert got["v"]["pids"] == [got["pid"]]
    assert got["repr"].startswith("ProcessUsage(pid=")


def test_visible_and_assigned_follow_cuda_visible_devices():
    out = run_python(
        "import gpuproc, json; v = gpuproc.visible(); a = gpuproc.assigned(); "
        "print(json.dumps([v.to_dict(), a.to_dict()]))",
        "4gpu",
        env={"CUDA_VISIBLE_DEVICES": "3,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
    )
    visible, assigned = json.loads(out)
    assert visible == assigned
    assert visible["cuda_visible_devices"] == "3,1"
    assert visible["order"] == "pci_bus_id"
    assert visible["order_is_exact"] is True
    assert [(d["cuda_index"], d["device"]["index"]) for d in visible["devices"]] == [(0, 3), (1, 1)]
    every = gpuproc.visible()
    assert every.cuda_visible_devices is None
    assert [d.device.index for d in every.devices] == [0, 1, 2, 3]


def test_no_driver_is_an_exception_with_the_cli_message():
    out = run_python(
        "import gpuproc\n"
        "try:\n"
        "    gpuproc.snapshot()\n"
        "except gpuproc.NoDriver as e:\n"
        "    assert isinstance(e, gpuproc.GpuError)\n"
        "    print(e.kind); print(e)\n",
        "nodriver",
    )
    kind, message = out.split("\n", 1)
    assert kind == "driver_not_loaded"
    cli = run_cli(["gpus"], scenario="nodriver")
    assert cli.returncode == 2
    assert cli.stderr == f"gpuproc: {message}"


def test_the_gpuproc_command_is_installed_with_the_package(gpuproc_bin):
    import sysconfig

    # Installed from the wheel's data directory into this environment's scripts directory.
    assert gpuproc_bin == os.path.join(sysconfig.get_path("scripts"), "gpuproc")
    out = subprocess.run(
        [gpuproc_bin, "--version"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0 and out.stdout.startswith("gpuproc ")
    via_module = run_python(
        "import runpy, sys; sys.argv = ['gpuproc', '--version']; "
        "runpy.run_module('gpuproc', run_name='__main__')",
        "4gpu",
    )
    assert via_module == out.stdout
    assert gpuproc.__version__ == out.stdout.split()[1]


def test_the_stubs_declare_every_public_name():
    stubs = os.path.join(os.path.dirname(gpuproc.__file__), "__init__.pyi")
    text = open(stubs).read()
    for name in gpuproc.__all__:
        assert f"def {name}(" in text or f"class {name}" in text or f"{name}:" in text, name
    assert os.path.exists(os.path.join(os.path.dirname(gpuproc.__file__), "py.typed"))


def test_records_are_built_from_their_fields_and_pickle():
    import multiprocessing
    import pickle

    snap = gpuproc.snapshot()
    copy_ = pickle.loads(pickle.dumps(snap))
    assert isinstance(copy_, gpuproc.Snapshot) and copy_ == snap
    assert isinstance(copy_.devices[0].memory, gpuproc.Memory)
    m = gpuproc.Memory(total=3, used=1, free=2)
    assert m == gpuproc.Memory(3, 1, 2) and m.to_dict() == {"total": 3, "used": 1, "free": 2}
    with pytest.raises(TypeError):
        gpuproc.Memory(3, "one", 2)
    with pytest.raises(TypeError):
        gpuproc.Mig(enabled=True, pending=False, instances=[m])  # not MigInstances
    # A pool worker's snapshot comes back to its parent.
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        theirs = pool.apply_async(gpuproc.snapshot).get(timeout=TIMEOUT)
    finally:
        pool.terminate()
        bounded(pool.join)
    assert isinstance(theirs, gpuproc.Snapshot)
    assert [d.uuid for d in theirs.devices] == [d.uuid for d in snap.devices]


def test_the_stubs_give_each_class_its_runtime_constructor():
    import ast
    import inspect

    stubs = os.path.join(os.path.dirname(gpuproc.__file__), "__init__.pyi")
    tree = ast.parse(open(stubs).read())
    checked = 0
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                stub_args = [a.arg for a in item.args.args[1:]]
                runtime = list(inspect.signature(getattr(gpuproc, node.name)).parameters)
                assert stub_args == runtime, node.name
                checked += 1
    assert checked == 19
