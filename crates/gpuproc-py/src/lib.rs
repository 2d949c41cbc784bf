//! The `gpuproc` Python package: gpuproc's GPU layer (snapshots, visible devices, leases)
//! for Python programs, and the `gpuproc` command, in one wheel.
//!
//! # Layout
//! - this crate builds the extension module `gpuproc._native` (PyO3, the stable ABI for
//!   CPython 3.9 and later: one wheel for every version);
//! - `python/gpuproc/` is the package around it: `__init__.py` re-exports the module,
//!   `__init__.pyi` and `py.typed` give type checkers and IDEs the signatures and docstrings,
//!   `__main__.py` makes `python -m gpuproc` run the command;
//! - `pyproject.toml` builds it with maturin.
//!
//! # The `gpuproc` command in the wheel
//! The command is the Rust binary of `crates/gpuproc-cli`, shipped in the wheel's
//! `gpuproc-<version>.data/scripts/` directory: pip installs the files there into the
//! environment's `bin/` as they are, so `gpuproc` on the `PATH` is the native program, with
//! no Python start-up before it runs (a `[project.scripts]` entry point would start an
//! interpreter only to `exec` the binary). This is how maturin itself ships binaries, and
//! what a pure-binary wheel such as ruff's contains; maturin's `bindings = "bin"` cannot be
//! combined with an extension module, so `scripts/build-wheel` builds the CLI and copies it
//! to `wheel-data/scripts/gpuproc` (the directory `[tool.maturin] data` names) before
//! `maturin build`. Everything happens offline, from the workspace. `python -m gpuproc`
//! finds the installed binary and `exec`s it (`gpuproc._cli`).
//!
//! The command must be a separate program: it re-executes itself (`/proc/self/exe`) for
//! `pick --hold` and `run`, which inside a Python interpreter would start Python.
//!
//! # Semantics
//! - Every call that reads the GPUs or waits releases the GIL; a pick that waits returns to
//!   Python every 200 ms so that Ctrl-C (and any signal handler) interrupts it.
//! - Errors are exceptions whose message is the Rust error's, causes included: see
//!   `GpuError` and its subclasses.
//! - A lease is held by the process that picked it, and ends when released, when the `Lease`
//!   object is garbage collected, or when that process dies (the lease table records the
//!   holder's PID and start time, so a SIGKILL frees the GPUs too).

mod errors;
mod lease;
mod records;
mod units;

use gpuproc::gpu;
use pyo3::prelude::*;

use errors::{gpu_error, pick_error};
use lease::{Ask, Lease};

/// A snapshot of every GPU on this machine with the processes using them.
///
/// Raises NoDriver without an NVIDIA driver, GpuError when NVML cannot count the devices.
#[pyfunction]
fn snapshot(py: Python<'_>) -> PyResult<records::Snapshot> {
    let snap = py.detach(gpu::snapshot).map_err(|e| gpu_error(py, &e))?;
    records::snapshot(py, &snap)
}

/// Every GPU, in NVML order; with `processes=False` without the processes (quicker).
#[pyfunction]
#[pyo3(signature = (processes = true))]
fn devices(py: Python<'_>, processes: bool) -> PyResult<Vec<Py<records::Device>>> {
    let list = py
        .detach(|| gpu::global().and_then(|g| g.devices(processes)))
        .map_err(|e| gpu_error(py, &e))?;
    list.iter().map(|d| records::device(py, d)).collect()
}

/// The number of GPUs NVML sees.
#[pyfunction]
fn device_count(py: Python<'_>) -> PyResult<u32> {
    py.detach(gpu::device_count).map_err(|e| gpu_error(py, &e))
}

/// Which GPUs process `pid` (and, with `descendants`, its children, their children and so
/// on) uses, and how much memory.
#[pyfunction]
#[pyo3(signature = (pid, descendants = true))]
fn usage_of(py: Python<'_>, pid: u32, descendants: bool) -> PyResult<records::ProcessUsage> {
    let usage = py
        .detach(|| gpu::usage_of(pid, descendants))
        .map_err(|e| gpu_error(py, &e))?;
    records::usage(py, &usage)
}

/// The devices this process may use, per CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER as CUDA
/// applies them, in CUDA's numbering, with live figures (no processes).
#[pyfunction]
fn visible(py: Python<'_>) -> PyResult<records::VisibleDevices> {
    let v = py.detach(gpu::visible).map_err(|e| gpu_error(py, &e))?;
    records::visible(py, &v)
}

/// The GPUs given to this process (through CUDA_VISIBLE_DEVICES): the same as `visible()`.
#[pyfunction]
fn assigned(py: Python<'_>) -> PyResult<records::VisibleDevices> {
    visible(py)
}

/// The leases in force on this machine (in this runtime directory), stale ones left out.
#[pyfunction]
fn leases(py: Python<'_>) -> PyResult<Vec<records::LeaseInfo>> {
    let table = py.detach(gpu::leases).map_err(|e| pick_error(py, &e))?;
    table
        .leases()
        .iter()
        .map(|r| records::lease_info(py, r))
        .collect()
}

/// The directory holding the lease table: $GPUPROC_RUNTIME_DIR, else
/// $XDG_RUNTIME_DIR/gpuproc, else /tmp/gpuproc-<uid>.
#[pyfunction]
fn runtime_dir() -> String {
    gpu::runtime_dir().to_string_lossy().into_owned()
}

/// Picks GPUs that meet the conditions and leases them to this process.
///
/// `n`: how many (default 1, or the length of `devices`). `min_free`: free memory, bytes or
/// a size such as "10GiB". `max_utilization`: percent. `no_foreign`: only GPUs no other
/// process uses. `max_per_gpu`: how many leases may share one GPU (1: exclusive). `order`:
/// "most-free", "lowest-index" or "round-robin". `devices`: only these GPUs (indices or
/// UUIDs). `wait`: seconds to wait for enough GPUs to qualify (None: fail at once;
/// float("inf"): for ever). `within_visible`: only among this process's
/// CUDA_VISIBLE_DEVICES.
///
/// Raises NoneFree (with each GPU's reason) when too few qualify, NoDriver without a driver,
/// InvalidRequest for an impossible request, LeaseError when the lease table is unusable.
#[pyfunction]
#[pyo3(signature = (n = None, *, min_free = None, max_utilization = None, no_foreign = false,
                    max_per_gpu = 1, order = "most-free", devices = None, wait = None,
                    within_visible = true))]
#[allow(clippy::too_many_arguments)]
fn pick(
    py: Python<'_>,
    n: Option<usize>,
    min_free: Option<&Bound<'_, PyAny>>,
    max_utilization: Option<u32>,
    no_foreign: bool,
    max_per_gpu: u32,
    order: &str,
    devices: Option<&Bound<'_, PyAny>>,
    wait: Option<f64>,
    within_visible: bool,
) -> PyResult<Lease> {
    let ask = Ask {
        n,
        min_free,
        max_utilization,
        no_foreign,
        max_per_gpu,
        order,
        devices,
        wait,
        within_visible,
    };
    lease::pick(py, &ask)
}

/// Leases GPUs for this worker process, for the life of the process, and (with `apply`)
/// sets CUDA_VISIBLE_DEVICES in os.environ: the initializer of a process pool.
///
/// The first call in a process picks (with the same arguments as `pick()`); later calls in
/// the same process return the same lease. The lease ends when the worker exits, however it
/// exits.
///
/// ```text
/// multiprocessing.Pool(8, initializer=gpuproc.worker_gpus, initargs=(1,))
/// ProcessPoolExecutor(4, initializer=gpuproc.worker_gpus, initargs=(1,))
/// Pool(8, initializer=functools.partial(gpuproc.worker_gpus, 1, max_per_gpu=2))
///
/// def main(rank, world_size):       # torch.multiprocessing.spawn(main, args=(4,), nprocs=4)
///     gpuproc.worker_gpus(1)        # before any CUDA call: the GPU is this rank's cuda:0
/// ```
#[pyfunction]
#[pyo3(signature = (n = 1, *, min_free = None, max_utilization = None, no_foreign = false,
                    max_per_gpu = 1, order = "most-free", devices = None, wait = None,
                    within_visible = true, apply = true))]
#[allow(clippy::too_many_arguments)]
fn worker_gpus(
    py: Python<'_>,
    n: usize,
    min_free: Option<&Bound<'_, PyAny>>,
    max_utilization: Option<u32>,
    no_foreign: bool,
    max_per_gpu: u32,
    order: &str,
    devices: Option<&Bound<'_, PyAny>>,
    wait: Option<f64>,
    within_visible: bool,
    apply: bool,
) -> PyResult<Py<Lease>> {
    let ask = Ask {
        n: Some(n),
        min_free,
        max_utilization,
        no_foreign,
        max_per_gpu,
        order,
        devices,
        wait,
        within_visible,
    };
    lease::worker_gpus(py, &ask, apply)
}

/// The lease `worker_gpus()` took in this process, or None.
#[pyfunction]
fn worker_lease(py: Python<'_>) -> Option<Py<Lease>> {
    lease::worker_lease(py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    records::register(m)?;
    m.add_class::<Lease>()?;
    m.add_function(wrap_pyfunction!(snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(devices, m)?)?;
    m.add_function(wrap_pyfunction!(device_count, m)?)?;
    m.add_function(wrap_pyfunction!(usage_of, m)?)?;
    m.add_function(wrap_pyfunction!(visible, m)?)?;
    m.add_function(wrap_pyfunction!(assigned, m)?)?;
    m.add_function(wrap_pyfunction!(leases, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_dir, m)?)?;
    m.add_function(wrap_pyfunction!(pick, m)?)?;
    m.add_function(wrap_pyfunction!(worker_gpus, m)?)?;
    m.add_function(wrap_pyfunction!(worker_lease, m)?)?;
    Ok(())
}
