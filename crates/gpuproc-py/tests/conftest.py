"""Runs the tests against the NVML simulator (crates/nvml-sim), each test with a lease table
of its own.

The simulator library is $GPUPROC_NVML_LIB, else target/debug/libnvml_sim.so of this
workspace (`cargo build -p nvml-sim`). This process sees the `4gpu` scenario: NVML reads the
scenario once per process, so checks on another scenario run in a child process
(`run_python`).
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LIB = os.environ.get("GPUPROC_NVML_LIB") or str(ROOT / "target" / "debug" / "libnvml_sim.so")
if not os.path.exists(LIB):
    raise RuntimeError(f"no NVML simulator at {LIB}: run `cargo build -p nvml-sim` first")
os.environ["GPUPROC_NVML_LIB"] = LIB
os.environ["NVML_SIM_SCENARIO"] = "4gpu"
for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVML_SIM_STATE_DIR"):
    os.environ.pop(name, None)

# Every blocking call in the tests has its own timeout; this is the limit of a whole test.
TIMEOUT = 60


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    """A lease table of this test's own (children inherit it through the environment)."""
    path = tmp_path / "runtime"
    monkeypatch.setenv("GPUPROC_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def gpuproc_bin():
    import gpuproc

    return gpuproc.find_gpuproc_bin()


def run_python(code, scenario, timeout=TIMEOUT, env=None):
    """Runs `code` in a new Python with the simulator on `scenario`; returns its stdout."""
    child_env = {**os.environ, "NVML_SIM_SCENARIO": scenario, **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_cli(args, scenario=None, timeout=TIMEOUT):
    import gpuproc

    env = dict(os.environ)
    if scenario:
        env["NVML_SIM_SCENARIO"] = scenario
    return subprocess.run(
        [gpuproc.find_gpuproc_bin(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def bounded(call, timeout=TIMEOUT):
    """Runs `call` (a join without a timeout of its own) in a thread, waiting at most
    `timeout` seconds for it."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{call} did not return within {timeout} s"
