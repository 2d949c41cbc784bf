//! Picking GPUs from Python: `pick()`, the `Lease` it returns (a context manager), and
//! `worker_gpus()` for the initializers of Python's process pools.

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use gpuproc::gpu::{self, Criteria, DeviceId, GpuLease, Order, PickError};
use gpuproc::time::{deadline, duration_from_secs_f64, remaining};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::{pick_error, InvalidRequest};
use crate::records;
use crate::units::parse_size;

/// How long one wait inside Rust lasts before Python's signal handlers get to run (so that
/// Ctrl-C interrupts a long `wait=`).
const SLICE: Duration = Duration::from_millis(200);

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a pick asks for, as Python passes it.
#[derive(Debug)]
pub struct Ask<'a, 'py> {
    pub n: Option<usize>,
    pub min_free: Option<&'a Bound<'py, PyAny>>,
    pub max_utilization: Option<u32>,
    pub no_foreign: bool,
    pub max_per_gpu: u32,
    pub order: &'a str,
    pub devices: Option<&'a Bound<'py, PyAny>>,
    pub wait: Option<f64>,
    pub within_visible: bool,
}

impl Ask<'_, '_> {
    fn criteria(&self) -> PyResult<(Criteria, Option<Duration>)> {
        let order = Order::from_str(self.order).map_err(PyValueError::new_err)?;
        let mut c = Criteria::new()
            .max_per_gpu(self.max_per_gpu)
            .no_foreign_processes(self.no_foreign)
            .order(order)
            .within_visible(self.within_visible);
        if let Some(n) = self.n {
            c = c.count(n);
        }
        if let Some(value) = self.min_free {
            c = c.min_free(size_arg(value)?);
        }
        if let Some(pct) = self.max_utilization {
            if pct > 100 {
                return Err(PyValueError::new_err(format!(
                    "max_utilization={pct}: expected a percentage from 0 to 100"
                )));
            }
            c = c.max_utilization(pct);
        }
        if let Some(list) = self.devices {
            c = c.devices(device_list(list)?);
        }
        let wait = match self.wait {
            None => None,
            Some(secs) => Some(
                duration_from_secs_f64(secs)
                    .map_err(|e| PyValueError::new_err(format!("wait: {e}")))?,
            ),
        };
        Ok((c, wait))
    }
}

/// `min_free`: bytes as an int, or a size such as "10GiB".
fn size_arg(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(text) = value.extract::<String>() {
        return parse_size(&text).map_err(|e| PyValueError::new_err(format!("min_free: {e}")));
    }
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "min_free: expected a number of bytes or a size such as \"10GiB\", got a bool",
        ));
    }
    match value.extract::<i128>() {
        Ok(n) => u64::try_from(n).map_err(|_| {
            PyValueError::new_err(format!(
                "min_free: {n} is not a number of bytes (expected 0 or more)"
            ))
        }),
        Err(_) => Err(PyTypeError::new_err(format!(
            "min_free: expected a number of bytes or a size such as \"10GiB\", got {}",
            value.get_type().name()?
        ))),
    }
}

/// `devices`: NVML indices and UUIDs (or unique UUID prefixes), or one comma-separated
/// string of them.
fn device_list(value: &Bound<'_, PyAny>) -> PyResult<Vec<DeviceId>> {
    if let Ok(text) = value.extract::<String>() {
        return DeviceId::parse_list(&text).map_err(PyValueError::new_err);
    }
    let mut out = Vec::new();
    for item in value.try_iter()? {
        let item = item?;
        if let Ok(text) = item.extract::<String>() {
            out.push(DeviceId::from_str(&text).map_err(PyValueError::new_err)?);
        } else if let Ok(n) = item.extract::<i128>() {
            let index = u32::try_from(n)
                .map_err(|_| PyValueError::new_err(format!("{n} is not a GPU index")))?;
            out.push(DeviceId::Index(index));
        } else {
            return Err(PyTypeError::new_err(format!(
                "devices: expected GPU indices (int) or UUIDs (str), got {}",
                item.get_type().name()?
            )));
        }
    }
    Ok(out)
}

/// Picks, waiting up to `wait` in slices so that Python's signal handlers run in between,
/// without the GIL while it looks and waits.
fn pick_blocking(
    py: Python<'_>,
    criteria: &Criteria,
    wait: Option<Duration>,
) -> PyResult<GpuLease> {
    let started = Instant::now();
    // `None`: no waiting; `Some(None)`: waiting for ever.
    let until = wait.map(deadline);
    loop {
        let ask = match until {
            None => criteria.clone(),
            Some(until) => criteria
                .clone()
                .wait(remaining(until).map_or(SLICE, |left| left.min(SLICE))),
        };
        match py.detach(|| gpu::pick(&ask)) {
            Ok(lease) => return Ok(lease),
            Err(PickError::NoneFree(mut why)) => {
                let time_left = until.is_some_and(|u| remaining(u).is_none_or(|l| !l.is_zero()));
                if !time_left || why.is_impossible() {
                    why.waited = wait.map(|_| started.elapsed());
                    return Err(pick_error(py, &PickError::NoneFree(why)));
                }
                py.check_signals()?;
            }
            Err(e) => return Err(pick_error(py, &e)),
        }
    }
}

/// An environment variable as `apply()` found and set it.
#[derive(Debug)]
struct Applied {
    name: String,
    before: Option<String>,
    set: String,
}

/// GPUs leased to this process by `pick()` or `worker_gpus()`.
///
/// The lease is recorded in the machine's lease table, so no other picker (in Python, in
/// Rust or `gpuproc pick`) hands the same GPUs out beyond their share limit, until it is
/// released: by `release()`, at the end of a `with` block, when the object is garbage
/// collected, or when this process dies, however it dies.
///
/// `env()` gives the environment a child process needs (`CUDA_VISIBLE_DEVICES` and
/// `NVIDIA_VISIBLE_DEVICES`, naming the GPUs by UUID); `apply()` sets it in `os.environ`,
/// which must happen before a framework (PyTorch, JAX, TensorFlow) initialises CUDA.
///
/// A copy inherited by a forked child does not hold or release anything: releasing it there
/// only forgets it.
#[pyclass(frozen, module = "gpuproc")]
#[derive(Debug)]
pub struct Lease {
    inner: Mutex<Option<GpuLease>>,
    applied: Mutex<Vec<Applied>>,
    id: String,
    devices: Vec<gpu::PickedDevice>,
    cuda_visible_devices: String,
    env: Vec<(String, String)>,
    owner: u32,
}

impl Lease {
    fn new(lease: GpuLease) -> Lease {
        Lease {
            id: lease.id().to_string(),
            devices: lease.devices().to_vec(),
            cuda_visible_devices: lease.cuda_visible_devices(),
            env: lease.env(),
            owner: std::process::id(),
            inner: Mutex::new(Some(lease)),
            applied: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on the lease handle without the GIL: a thread waiting for the handle (held
    /// by another thread while it updates the lease table) must not hold the GIL, which the
    /// other thread needs to return to Python.
    fn with_inner<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Option<GpuLease>) -> R + Send,
    ) -> R {
        py.detach(|| f(&mut locked(&self.inner)))
    }

    /// Puts back what `apply()` changed, where the variables still hold what it set.
    fn restore_env(&self, py: Python<'_>) -> PyResult<()> {
        let applied = std::mem::take(&mut *locked(&self.applied));
        if applied.is_empty() {
            return Ok(());
        }
        let environ = py.import("os")?.getattr("environ")?;
        for a in applied.into_iter().rev() {
            let now: Option<String> = environ.call_method1("get", (&a.name,))?.extract()?;
            if now.as_deref() != Some(a.set.as_str()) {
                continue;
            }
            match a.before {
                Some(v) => environ.set_item(&a.name, v)?,
                None => environ.del_item(&a.name)?,
            }
        }
        Ok(())
    }
}

#[pymethods]
impl Lease {
    /// The lease's id in the lease table.
    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// The GPUs, in the order CUDA_VISIBLE_DEVICES lists them (cuda:0 first).
    #[getter]
    fn devices(&self, py: Python<'_>) -> PyResult<Vec<Py<records::PickedDevice>>> {
        self.devices
            .iter()
            .map(|d| records::picked(py, d))
            .collect()
    }

    /// Their NVML indices (as nvidia-smi and `gpuproc gpus` number them).
    #[getter]
    fn indices(&self) -> Vec<u32> {
        self.devices.iter().map(|d| d.index).collect()
    }

    /// Their UUIDs.
    #[getter]
    fn uuids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.uuid.clone()).collect()
    }

    /// The CUDA_VISIBLE_DEVICES value naming them: full UUIDs, comma-separated.
    #[getter]
    fn cuda_visible_devices(&self) -> &str {
        &self.cuda_visible_devices
    }

    /// Whether the lease has been released (or was inherited through fork and forgotten).
    #[getter]
    fn released(&self, py: Python<'_>) -> bool {
        self.with_inner(py, |inner| inner.is_none())
    }

    /// The environment a process needs to use these GPUs, as a new dict:
    /// CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES (for containers started with the
    /// NVIDIA runtime). For `subprocess.run(..., env={**os.environ, **lease.env()})`.
    fn env<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.env {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Sets `env()` in `os.environ`, so that this process (and the children it starts)
    /// use these GPUs. Call it before anything initialises CUDA: CUDA reads
    /// CUDA_VISIBLE_DEVICES once. Releasing the lease puts back the previous values of the
    /// variables that still hold what `apply()` set. Returns the lease.
    fn apply(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let py = slf.py();
        let this = slf.get();
        if this.released(py) {
            return Err(InvalidRequest::new_err(format!(
                "lease {} is released: its GPUs are no longer this process's",
                this.id
            )));
        }
        let environ = py.import("os")?.getattr("environ")?;
        let mut applied = locked(&this.applied);
        for (name, value) in &this.env {
            let before: Option<String> = environ.call_method1("get", (name,))?.extract()?;
            environ.set_item(name, value)?;
            // Applying twice keeps the value from before the first time.
            if !applied.iter().any(|a| &a.name == name) {
                applied.push(Applied {
                    name: name.clone(),
                    before,
                    set: value.clone(),
                });
            }
        }
        drop(applied);
        Ok(slf)
    }

    /// Adds process `pid` as a holder: the lease then lasts while this process or `pid`
    /// runs (for a child that must keep the GPUs should this process die first).
    fn share_with(&self, py: Python<'_>, pid: u32) -> PyResult<()> {
        match self.with_inner(py, |inner| inner.as_mut().map(|l| l.share_with(pid))) {
            None => Err(InvalidRequest::new_err(format!(
                "lease {} is released",
                self.id
            ))),
            Some(result) => result.map_err(|e| pick_error(py, &e)),
        }
    }

    /// Releases the GPUs now. Releasing twice does nothing; so does releasing in a forked
    /// child a lease its parent took (the parent still holds it).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let owner = self.owner;
        let released = self.with_inner(py, |inner| {
            let lease = inner.take()?;
            if std::process::id() != owner {
                // The parent's lease: dropping a copy in a child leaves the table alone.
                drop(lease);
                return Some(Ok(()));
            }
            Some(lease.release())
        });
        match released {
            None => Ok(()),
            Some(result) => {
                self.restore_env(py)?;
                result.map_err(|e| pick_error(py, &e))
            }
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.release(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Lease(id='{}', indices={:?}, cuda_visible_devices='{}', released={})",
            self.id,
            self.indices(),
            self.cuda_visible_devices,
            if self.released(py) { "True" } else { "False" }
        )
    }
}

/// Picks GPUs and leases them to this process.
pub fn pick(py: Python<'_>, ask: &Ask<'_, '_>) -> PyResult<Lease> {
    let (criteria, wait) = ask.criteria()?;
    Ok(Lease::new(pick_blocking(py, &criteria, wait)?))
}

/// The lease `worker_gpus` took in this process, with the process id that took it (a forked
/// child inherits its parent's entry, which is not its own).
static WORKER: Mutex<Option<(u32, Py<Lease>)>> = Mutex::new(None);

/// `worker_gpus()`: the lease of this worker, taken on the first call in this process.
pub fn worker_gpus(py: Python<'_>, ask: &Ask<'_, '_>, apply: bool) -> PyResult<Py<Lease>> {
    let me = std::process::id();
    let existing = locked(&WORKER)
        .as_ref()
        .filter(|(pid, _)| *pid == me)
        .map(|(_, lease)| lease.clone_ref(py));
    if let Some(lease) = existing {
        let (criteria, _) = ask.criteria()?;
        let held = lease.get();
        let released = held.released(py);
        if released || held.devices.len() != criteria.gpu_count() {
            return Err(InvalidRequest::new_err(format!(
                "this process already called worker_gpus() and got lease {} ({} GPU{}{}); \
                 a worker has one worker lease",
                held.id,
                held.devices.len(),
                if held.devices.len() == 1 { "" } else { "s" },
                if released { ", since released" } else { "" }
            )));
        }
        if apply {
            Lease::apply(lease.bind(py).clone())?;
        }
        return Ok(lease);
    }
    let lease = Py::new(py, pick(py, ask)?)?;
    if apply {
        Lease::apply(lease.bind(py).clone())?;
    }
    // Replacing a parent's entry inherited through fork drops this process's copy of the
    // parent's lease, which leaves the table alone.
    let old = locked(&WORKER).replace((me, lease.clone_ref(py)));
    drop(old);
    Ok(lease)
}

/// The lease `worker_gpus()` took in this process, if any.
pub fn worker_lease(py: Python<'_>) -> Option<Py<Lease>> {
    let me = std::process::id();
    locked(&WORKER)
        .as_ref()
        .filter(|(pid, _)| *pid == me)
        .map(|(_, lease)| lease.clone_ref(py))
}
