//! Loads the built `libnvml_sim.so` through libloading, as nvml-wrapper does, and checks its
//! answers; then cross-checks pynvml and gpustat against the same scenarios.
//!
//! The simulator's state is process-global, so every test holds [`LOCK`] for its whole session.

use std::ffi::{c_char, c_uint, c_ulonglong, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use nvml_sim::ffi::{
    field, nvmlBAR1Memory_t, nvmlEventData_t, nvmlFieldValue_t, nvmlMemory_t, nvmlMemory_v2_t,
    nvmlPciInfo_t, nvmlProcessInfo_v1_t, nvmlProcessInfo_v2_t, nvmlProcessUtilizationSample_t,
    nvmlSample_t, nvmlUtilization_t, nvmlValue_t, NVML_MEMORY_V2,
};
use nvml_sim::Scenario;

type Dev = *mut c_void;

static LOCK: Mutex<()> = Mutex::new(());

/// Finds the cdylib; builds it when a plain `cargo test` did not leave one next to us.
fn lib_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = nvml_sim::library_path() {
            return p;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new("timeout")
            .args(["-k", "10", "600", &cargo, "build", "-p", "nvml-sim"])
            .status()
            .expect("run cargo build -p nvml-sim");
        assert!(status.success(), "cargo build -p nvml-sim failed");
        nvml_sim::library_path().expect("libnvml_sim.so next to the test binary after building it")
    })
    .clone()
}

fn lib() -> &'static libloading::Library {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    // SAFETY: loading our own cdylib runs no initialisers beyond Rust's std setup.
    LIB.get_or_init(|| {
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe { libloading::Library::new(lib_path()) }.expect("dlopen libnvml_sim.so")
    })
}

/// Looks up an exported function.
fn sym<T: Copy>(name: &str) -> T {
    // SAFETY: every call site names the C signature of that NVML function from nvml.h.
    unsafe {
        *lib()
            .get::<T>(name.as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

fn call0(name: &str) -> u32 {
    // SAFETY: nvmlInit*/nvmlShutdown take no arguments.
    unsafe { sym::<unsafe extern "C" fn() -> u32>(name)() }
}

/// One simulator session with `spec` loaded; shuts down fully when dropped.
struct Session {
    _guard: MutexGuard<'static, ()>,
}

fn set_scenario(spec: Option<&str>) {
    let c = spec.map(|s| CString::new(s).unwrap());
    let p = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: `p` is null or a NUL-terminated string that outlives the call.
    let rc = unsafe { sym::<unsafe extern "C" fn(*const c_char) -> u32>("nvmlSimSetScenario")(p) };
    assert_eq!(rc, 0);
}

fn session(spec: &str) -> Session {
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    while call0("nvmlShutdown") == 0 {}
    set_scenario(Some(spec));
    assert_eq!(call0("nvmlInit_v2"), 0, "init with {spec}");
    Session { _guard: guard }
}

impl Drop for Session {
    fn drop(&mut self) {
        while call0("nvmlShutdown") == 0 {}
        set_scenario(None);
    }
}

fn handle(i: u32) -> Dev {
    let mut h: Dev = std::ptr::null_mut();
    // SAFETY: `h` is a valid out-pointer.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(c_uint, *mut Dev) -> u32>("nvmlDeviceGetHandleByIndex_v2")(
            i, &mut h,
        )
    };
    assert_eq!(rc, 0);
    h
}

fn string(name: &str, h: Dev) -> Result<String, u32> {
    let mut buf = [0 as c_char; 96];
    // SAFETY: `buf` holds 96 bytes.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_char, c_uint) -> u32>(name)(h, buf.as_mut_ptr(), 96)
    };
    if rc != 0 {
        return Err(rc);
    }
    // SAFETY: the simulator NUL-terminates on success.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string())
}

fn uint(name: &str, h: Dev) -> Result<u32, u32> {
    let mut v: c_uint = 0;
    // SAFETY: `v` is a valid out-pointer.
    let rc = unsafe { sym::<unsafe extern "C" fn(Dev, *mut c_uint) -> u32>(name)(h, &mut v) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(rc)
    }
}

fn handle_out(name: &str, h: Dev, arg: Option<u32>) -> Result<Dev, u32> {
    let mut out: Dev = std::ptr::null_mut();
    // SAFETY: `out` is a valid out-pointer; the signatures match nvml.h.
    let rc = unsafe {
        match arg {
            Some(a) => {
                sym::<unsafe extern "C" fn(Dev, c_uint, *mut Dev) -> u32>(name)(h, a, &mut out)
            }
            None => sym::<unsafe extern "C" fn(Dev, *mut Dev) -> u32>(name)(h, &mut out),
        }
    };
    if rc == 0 {
        Ok(out)
    } else {
        Err(rc)
    }
}

fn memory_v2(h: Dev) -> nvmlMemory_v2_t {
    let mut m = nvmlMemory_v2_t {
        version: NVML_MEMORY_V2,
        total: 0,
        reserved: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: `m` is a valid, versioned out-struct.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut nvmlMemory_v2_t) -> u32>("nvmlDeviceGetMemoryInfo_v2")(
            h, &mut m,
        )
    };
    assert_eq!(rc, 0);
    m
}

/// (rc, count) for a process query with a buffer of `cap` v2 entries (null when `cap` is 0).
fn procs_v3(name: &str, h: Dev, cap: u32) -> (u32, u32, Vec<nvmlProcessInfo_v2_t>) {
    let mut buf = vec![
        nvmlProcessInfo_v2_t {
            pid: 0,
            usedGpuMemory: 0,
            gpuInstanceId: 0,
            computeInstanceId: 0
        };
        cap as usize
    ];
    let mut count = cap;
    let p = if cap == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: `buf` holds `cap` entries, `count` says so.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut nvmlProcessInfo_v2_t) -> u32>(name)(
            h, &mut count, p,
        )
    };
    buf.truncate(if rc == 0 { count as usize } else { 0 });
    (rc, count, buf)
}

/// A session on one device with no memory of its own, whose allocations come from `dir`.
fn state_dir_session(dir: &std::path::Path) -> Session {
    let path = dir.join("s.json");
    let scenario = format!(
        r#"{{"state_dir": {:?}, "devices": [{{"memory_used": 0}}]}}"#,
        dir.join("").to_str().unwrap()
    );
    std::fs::write(&path, scenario).unwrap();
    session(path.to_str().unwrap())
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvml-sim-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_listed_function_is_exported() {
    for name in nvml_sim::ffi::EXPORTED {
        // SAFETY: only the address is looked up, nothing is called.
        unsafe { lib().get::<*const c_void>(name.as_bytes()) }
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn init_is_reference_counted() {
    let _s = session("default");
    assert_eq!(call0("nvmlInit"), 0);
    assert_eq!(call0("nvmlShutdown"), 0);
    assert_eq!(
        uint("nvmlDeviceGetIndex", handle(0)),
        Ok(0),
        "still initialised after one shutdown"
    );
    assert_eq!(call0("nvmlShutdown"), 0);
    assert_eq!(call0("nvmlShutdown"), 1, "NVML_ERROR_UNINITIALIZED");
    let mut n = 0;
    // SAFETY: valid out-pointer.
    let rc =
        unsafe { sym::<unsafe extern "C" fn(*mut c_uint) -> u32>("nvmlDeviceGetCount_v2")(&mut n) };
    assert_eq!(rc, 1);
    // SAFETY: nvmlInitWithFlags takes one unsigned int.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe { sym::<unsafe extern "C" fn(c_uint) -> u32>("nvmlInitWithFlags")(0) },
        0
    );
}

#[test]
fn error_string_works_without_init() {
    let f = sym::<extern "C" fn(u32) -> *const c_char>("nvmlErrorString");
    // SAFETY: nvmlErrorString returns a static NUL-terminated string.
    let text = |c| unsafe { CStr::from_ptr(f(c)) }.to_str().unwrap();
    assert_eq!(text(15), "GPU is lost");
    assert_eq!(text(9), "Driver Not Loaded");
    assert_eq!(text(424242), "Unknown Error");
}

#[test]
fn eight_gpus_answer_from_the_scenario() {
    let scenario = Scenario::bundled("8gpu").unwrap();
    let _s = session("8gpu");
    let mut n = 0;
    // SAFETY: valid out-pointer.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe { sym::<unsafe extern "C" fn(*mut c_uint) -> u32>("nvmlDeviceGetCount_v2")(&mut n) },
        0
    );
    assert_eq!(n, 8);
    for (i, d) in scenario.devices.iter().enumerate() {
        let h = handle(i as u32);
        assert_eq!(string("nvmlDeviceGetName", h).unwrap(), d.name);
        assert_eq!(string("nvmlDeviceGetUUID", h).unwrap(), d.uuid);
        assert_eq!(string("nvmlDeviceGetSerial", h).unwrap(), d.serial);
        assert_eq!(uint("nvmlDeviceGetIndex", h), Ok(i as u32));
        assert_eq!(
            uint("nvmlDeviceGetPowerUsage", h),
            Ok(d.power_usage_mw.fixed().unwrap())
        );
        assert_eq!(
            uint("nvmlDeviceGetEnforcedPowerLimit", h),
            Ok(d.power_limit_mw)
        );
        assert_eq!(
            uint("nvmlDeviceGetFanSpeed", h),
            Err(3),
            "H100s have no fan"
        );
        let procs: u64 = d.processes.iter().map(|p| p.used_memory.0).sum();
        let m = memory_v2(h);
        assert_eq!(m.total, d.memory_total.0);
        assert_eq!(m.used, d.memory_used.0 + procs);
        assert_eq!(m.free + m.used + m.reserved, m.total);
        let mut m1 = nvmlMemory_t {
            total: 0,
            free: 0,
            used: 0,
        };
        // SAFETY: valid out-struct.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(Dev, *mut nvmlMemory_t) -> u32>(
                    "nvmlDeviceGetMemoryInfo",
                )(h, &mut m1)
            },
            0
        );
        assert_eq!(
            m1.used,
            m.used + m.reserved,
            "v1 counts reserved memory as used"
        );
        let mut u = nvmlUtilization_t { gpu: 0, memory: 0 };
        // SAFETY: valid out-struct.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(Dev, *mut nvmlUtilization_t) -> u32>(
                    "nvmlDeviceGetUtilizationRates",
                )(h, &mut u)
            },
            0
        );
        assert_eq!(
            (Some(u.gpu), Some(u.memory)),
            (d.utilization_gpu.fixed(), d.utilization_memory.fixed())
        );
        let mut temp = 0;
        // SAFETY: valid out-pointer.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint) -> u32>(
                    "nvmlDeviceGetTemperature",
                )(h, 0, &mut temp)
            },
            0
        );
        assert_eq!(Some(temp), d.temperature_c.fixed());
        // SAFETY: zeroed is a valid nvmlPciInfo_t.
        let mut pci: nvmlPciInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-struct of the v3 layout.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(Dev, *mut nvmlPciInfo_t) -> u32>(
                    "nvmlDeviceGetPciInfo_v3",
                )(h, &mut pci)
            },
            0
        );
        // SAFETY: NUL-terminated by the simulator.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe { CStr::from_ptr(pci.busId.as_ptr()) }
                .to_str()
                .unwrap(),
            d.pci_bus_id
        );
        // Look-ups by UUID and by the legacy lower-case bus id find the same handle.
        let uuid = CString::new(d.uuid.clone()).unwrap();
        let legacy = CString::new(d.pci_bus_id[4..].to_lowercase()).unwrap();
        let mut by: Dev = std::ptr::null_mut();
        // SAFETY: NUL-terminated input, valid out-pointer.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(*const c_char, *mut Dev) -> u32>(
                    "nvmlDeviceGetHandleByUUID",
                )(uuid.as_ptr(), &mut by)
            },
            0
        );
        assert_eq!(by, h);
        // SAFETY: as above.
        assert_eq!(
            // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
            unsafe {
                sym::<unsafe extern "C" fn(*const c_char, *mut Dev) -> u32>(
                    "nvmlDeviceGetHandleByPciBusId_v2",
                )(legacy.as_ptr(), &mut by)
            },
            0
        );
        assert_eq!(by, h);
    }
    // "self" is this test process, on GPU 1.
    let (_, _, list) = procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", handle(1), 8);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].pid, std::process::id());
    assert_eq!(list[0].gpuInstanceId, u32::MAX);
    let (_, _, gfx) = procs_v3("nvmlDeviceGetGraphicsRunningProcesses_v3", handle(5), 8);
    assert_eq!(gfx.len(), 1);
    let mut name = [0 as c_char; 64];
    // SAFETY: `name` holds 64 bytes.
    let rc =
        unsafe {
            sym::<unsafe extern "C" fn(c_uint, *mut c_char, c_uint) -> u32>(
                "nvmlSystemGetProcessName",
            )(gfx[0].pid, name.as_mut_ptr(), 64)
        };
    assert_eq!(rc, 0);
    // SAFETY: NUL-terminated on success.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().unwrap(),
        "Xorg"
    );
}

#[test]
fn process_lists_follow_the_buffer_size_protocol() {
    let _s = session("8gpu");
    let f = "nvmlDeviceGetComputeRunningProcesses_v3";
    let h = handle(4); // four processes
    assert_eq!(procs_v3(f, h, 0).0, 7, "null buffer: INSUFFICIENT_SIZE");
    assert_eq!(procs_v3(f, h, 0).1, 4, "with the needed count");
    assert_eq!(procs_v3(f, h, 3).0, 7);
    let (rc, count, list) = procs_v3(f, h, 10);
    assert_eq!((rc, count, list.len()), (0, 4, 4));
    assert_eq!(
        list.iter().map(|p| p.usedGpuMemory).sum::<u64>(),
        25u64 << 30
    );
    assert_eq!(
        procs_v3(f, handle(7), 0).0,
        0,
        "no processes: success with 0"
    );
    // v1 entries are 16 bytes, not 24.
    let mut v1 = [nvmlProcessInfo_v1_t {
        pid: 0,
        usedGpuMemory: 0,
    }; 4];
    let mut count = 4;
    // SAFETY: `v1` holds 4 entries.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut nvmlProcessInfo_v1_t) -> u32>(
            "nvmlDeviceGetComputeRunningProcesses",
        )(h, &mut count, v1.as_mut_ptr())
    };
    assert_eq!((rc, count), (0, 4));
    assert_eq!(v1[3].usedGpuMemory, 16 << 30);
    // Null count pointer.
    // SAFETY: null is what is being tested; the simulator checks it.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut nvmlProcessInfo_v2_t) -> u32>(f)(
            h,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 2);
}

#[test]
fn bad_arguments_are_rejected() {
    let _s = session("default");
    let h = handle(0);
    assert_eq!(
        uint("nvmlDeviceGetIndex", 0x1234 as Dev),
        Err(2),
        "garbage handle"
    );
    // SAFETY: null out-pointer is what is being tested.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint) -> u32>("nvmlDeviceGetPowerUsage")(
                h,
                std::ptr::null_mut(),
            )
        },
        2
    );
    let mut small = [0 as c_char; 4];
    // SAFETY: `small` holds 4 bytes and we say so.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_char, c_uint) -> u32>("nvmlDeviceGetName")(
                h,
                small.as_mut_ptr(),
                4,
            )
        },
        7
    );
    let mut m = nvmlMemory_v2_t {
        version: 1,
        total: 0,
        reserved: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: valid out-struct with a wrong version.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut nvmlMemory_v2_t) -> u32>(
                "nvmlDeviceGetMemoryInfo_v2",
            )(h, &mut m)
        },
        25
    );
    let mut out: Dev = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(c_uint, *mut Dev) -> u32>("nvmlDeviceGetHandleByIndex_v2")(
                1, &mut out,
            )
        },
        2
    );
    let missing = CString::new("GPU-nope").unwrap();
    // SAFETY: NUL-terminated input, valid out-pointer.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(*const c_char, *mut Dev) -> u32>("nvmlDeviceGetHandleByUUID")(
                missing.as_ptr(),
                &mut out,
            )
        },
        6
    );
    let mut temp = 0;
    // SAFETY: valid out-pointer, unknown sensor.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint) -> u32>("nvmlDeviceGetTemperature")(
                h, 7, &mut temp,
            )
        },
        2
    );
}

#[test]
fn failures_unsupported_fields_and_ecc() {
    let dir = temp_dir("fail");
    let path = dir.join("fail.toml");
    std::fs::write(
        &path,
        r#"
        [[devices]]
        unsupported = ["temperature", "ecc"]
        [[devices]]
        ecc = { enabled = true, corrected = 5, uncorrected = 2 }
        [[failures]]
        function = "nvmlDeviceGetPowerUsage"
        error = "UNKNOWN"
        fail_after = 2
        [[failures]]
        function = "nvmlDeviceGetComputeRunningProcesses"
        error = "NO_PERMISSION"
        device = 1
        "#,
    )
    .unwrap();
    let _s = session(path.to_str().unwrap());
    let (a, b) = (handle(0), handle(1));
    assert_eq!(uint("nvmlDeviceGetPowerUsage", a), Ok(71_000));
    assert_eq!(uint("nvmlDeviceGetPowerUsage", b), Ok(71_000));
    assert_eq!(
        uint("nvmlDeviceGetPowerUsage", a),
        Err(999),
        "third call fails"
    );
    assert_eq!(uint("nvmlDeviceGetPowerUsage", b), Err(999));
    let mut t = 0;
    // SAFETY: valid out-pointer.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint) -> u32>("nvmlDeviceGetTemperature")(
                a, 0, &mut t,
            )
        },
        3
    );
    assert_eq!(
        procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", a, 0).0,
        0
    );
    assert_eq!(
        procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", b, 0).0,
        4,
        "versioned name matches"
    );
    let ecc = |h: Dev, kind: c_uint| {
        let mut v: c_ulonglong = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe {
            sym::<unsafe extern "C" fn(Dev, c_uint, c_uint, *mut c_ulonglong) -> u32>(
                "nvmlDeviceGetTotalEccErrors",
            )(h, kind, 1, &mut v)
        };
        (rc, v)
    };
    assert_eq!(ecc(a, 0).0, 3);
    assert_eq!(ecc(b, 0), (0, 5));
    assert_eq!(ecc(b, 1), (0, 2));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn lost_gpu_fails_every_query_and_spares_the_others() {
    let _s = session("lost");
    let lost = handle(2);
    assert_eq!(string("nvmlDeviceGetName", lost), Err(15));
    assert_eq!(uint("nvmlDeviceGetIndex", lost), Err(15));
    assert_eq!(
        procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", lost, 0).0,
        15
    );
    assert_eq!(
        string("nvmlDeviceGetName", handle(3)).unwrap(),
        "NVIDIA H100 80GB HBM3"
    );
}

#[test]
fn init_failures() {
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    while call0("nvmlShutdown") == 0 {}
    set_scenario(Some("nodriver"));
    assert_eq!(call0("nvmlInit_v2"), 9);
    assert_eq!(call0("nvmlShutdown"), 1);
    set_scenario(Some("/nonexistent/scenario.toml"));
    assert_eq!(call0("nvmlInit_v2"), 999);
    set_scenario(Some("nodevices"));
    assert_eq!(call0("nvmlInit_v2"), 0);
    assert_eq!(uint("nvmlDeviceGetIndex", std::ptr::null_mut()), Err(2));
    assert_eq!(call0("nvmlShutdown"), 0);
    set_scenario(None);
    drop(guard);
}

#[test]
fn mig_devices() {
    let scenario = Scenario::bundled("mig").unwrap();
    let _s = session("mig");
    let gpu = handle(0);
    let mut cur = 9;
    let mut pending = 9;
    // SAFETY: valid out-pointers.
    assert_eq!(
        // SAFETY: the pointers passed are valid for this call; the signature is the one in nvml.h.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint) -> u32>(
                "nvmlDeviceGetMigMode",
            )(gpu, &mut cur, &mut pending)
        },
        0
    );
    assert_eq!((cur, pending), (1, 1));
    assert_eq!(uint("nvmlDeviceGetMaxMigDeviceCount", gpu), Ok(7));
    assert_eq!(uint("nvmlDeviceIsMigDeviceHandle", gpu), Ok(0));
    assert_eq!(uint("nvmlDeviceGetGpuInstanceId", gpu), Err(3));
    for (j, inst) in scenario.devices[0].mig.iter().enumerate() {
        let m = handle_out("nvmlDeviceGetMigDeviceHandleByIndex", gpu, Some(j as u32)).unwrap();
        assert_eq!(uint("nvmlDeviceIsMigDeviceHandle", m), Ok(1));
        assert_eq!(string("nvmlDeviceGetUUID", m).unwrap(), inst.uuid);
        assert!(string("nvmlDeviceGetName", m)
            .unwrap()
            .ends_with(&inst.profile));
        assert_eq!(
            uint("nvmlDeviceGetGpuInstanceId", m),
            Ok(inst.gpu_instance_id)
        );
        assert_eq!(
            uint("nvmlDeviceGetComputeInstanceId", m),
            Ok(inst.compute_instance_id)
        );
        assert_eq!(
            handle_out("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", m, None),
            Ok(gpu)
        );
        assert_eq!(memory_v2(m).total, inst.memory_total.0);
        let (_, _, list) = procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", m, 8);
        assert_eq!(list.len(), inst.processes.len());
        assert!(list.iter().all(|p| p.gpuInstanceId == inst.gpu_instance_id));
        assert_eq!(
            uint("nvmlDeviceGetIndex", m),
            Err(3),
            "MIG handles have no index"
        );
    }
    assert_eq!(
        handle_out("nvmlDeviceGetMigDeviceHandleByIndex", gpu, Some(3)),
        Err(6)
    );
    assert_eq!(
        procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", gpu, 8)
            .2
            .len(),
        3
    );
    // In MIG mode the GPU has no utilisation of its own, as in NVML; with MIG off it has.
    assert_eq!(with_null("nvmlDeviceGetUtilizationRates", gpu, false), 3);
    assert_eq!(
        process_utilization(gpu, Some(8), 0).0,
        3,
        "no per-process utilisation in MIG mode"
    );
    let mut u = nvmlUtilization_t { gpu: 9, memory: 9 };
    // SAFETY: valid out-struct.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut nvmlUtilization_t) -> u32>(
            "nvmlDeviceGetUtilizationRates",
        )(handle(1), &mut u)
    };
    assert_eq!((rc, u.gpu), (0, 0));
    let m = handle_out("nvmlDeviceGetMigDeviceHandleByIndex", gpu, Some(0)).unwrap();
    assert_eq!(
        bar1(m).unwrap().bar1Total,
        (((128u64 << 30) * 39 / 80) >> 20) << 20,
        "a MIG device gets its memory's share of BAR1"
    );
    // The second GPU is MIG-capable with MIG off.
    assert_eq!(
        handle_out("nvmlDeviceGetMigDeviceHandleByIndex", handle(1), Some(0)),
        Err(2)
    );
}

#[test]
fn live_allocations_from_the_state_dir() {
    let dir = temp_dir("state");
    let me = std::process::id();
    std::fs::write(dir.join(format!("0-{me}")), "1073741824").unwrap();
    std::fs::write(dir.join("0-4294967295"), "5").unwrap(); // no such process
    let _s = state_dir_session(&dir);
    let h = handle(0);
    if std::env::var_os(nvml_sim::STATE_DIR_ENV).is_none() {
        let (_, _, list) = procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", h, 4);
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].pid, list[0].usedGpuMemory), (me, 1 << 30));
        assert_eq!(memory_v2(h).used, 1 << 30);
        std::fs::remove_file(dir.join(format!("0-{me}"))).unwrap();
        assert_eq!(memory_v2(h).used, 0, "files are read at every query");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn half_written_state_files_do_not_hide_the_process() {
    let dir = temp_dir("half-written");
    let me = std::process::id();
    let file = dir.join(format!("0-{me}"));
    // Written aside and renamed: only the final file is left, with a final newline.
    nvml_sim::state::write_allocation(&dir, 0, me, 1 << 30).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("0-{me}")]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1073741824\n");

    let _s = state_dir_session(&dir);
    let h = handle(0);
    if std::env::var_os(nvml_sim::STATE_DIR_ENV).is_none() {
        let listed = || {
            let (rc, _, list) = procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", h, 4);
            assert_eq!(rc, 0);
            list.iter()
                .map(|p| (p.pid, p.usedGpuMemory))
                .collect::<Vec<_>>()
        };
        assert_eq!(listed(), vec![(me, 1 << 30)]);
        // Caught by a query between an in-place writer's truncate and its write, or mid-way
        // through its write: the last value read stands.
        for torn in ["", "10737x", "\n"] {
            std::fs::write(&file, torn).unwrap();
            assert_eq!(listed(), vec![(me, 1 << 30)], "{torn:?}");
            assert_eq!(memory_v2(h).used, 1 << 30, "{torn:?}");
        }
        nvml_sim::state::write_allocation(&dir, 0, me, 2 << 30).unwrap();
        assert_eq!(listed(), vec![(me, 2 << 30)]);
        // Never read whole yet: listed, with nothing counted.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(listed(), vec![]);
        std::fs::write(&file, "").unwrap();
        assert_eq!(listed(), vec![(me, 0)]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn concurrent_queries_from_many_threads() {
    let _s = session("8gpu");
    std::thread::scope(|s| {
        for t in 0..8u32 {
            s.spawn(move || {
                for _ in 0..200 {
                    assert_eq!(call0("nvmlInit_v2"), 0);
                    let h = handle(t);
                    assert_eq!(uint("nvmlDeviceGetIndex", h), Ok(t));
                    assert!(procs_v3("nvmlDeviceGetComputeRunningProcesses_v3", h, 16).0 == 0);
                    assert_eq!(call0("nvmlShutdown"), 0);
                }
            });
        }
    });
    assert_eq!(
        uint("nvmlDeviceGetIndex", handle(0)),
        Ok(0),
        "the session's own reference survives"
    );
}

// ---- cross-check with pynvml and gpustat ------------------------------------------------------

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("GPUPROC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"));
    p.exists().then_some(p)
}

/// Runs the venv python with the simulator as libnvidia-ml (120 s limit).
fn run_python(scenario: &str, args: &[&str]) -> (String, String) {
    let py = python().unwrap();
    let dir = temp_dir("pylib");
    nvml_sim::make_pynvml_dir(&dir).unwrap();
    let out = Command::new("timeout")
        .args(["-k", "5", "120"])
        .arg(&py)
        .args(args)
        .env("LD_LIBRARY_PATH", &dir)
        .env("NVML_SIM_SCENARIO", scenario)
        .env_remove(nvml_sim::STATE_DIR_ENV)
        .output()
        .expect("run python");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{py:?} {args:?} with {scenario}: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn dump_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python/dump.py")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn pynvml_and_gpustat_agree_with_the_scenarios() {
    if python().is_none() {
        println!("note: skipping the pynvml/gpustat cross-check: no python at GPUPROC_PYTHON or .venv/bin/python");
        return;
    }
    lib_path();
    const MIB: u64 = 1 << 20;
    for name in ["8gpu", "mig"] {
        let scenario = Scenario::bundled(name).unwrap();
        let (out, _) = run_python(name, &[&dump_script()]);
        let dump: serde_json::Value = serde_json::from_str(&out).unwrap();
        let py_pid = dump["pid"].as_u64().unwrap() as u32;
        let (gs, _) = run_python(name, &["-m", "gpustat", "--json"]);
        let gs: serde_json::Value = serde_json::from_str(&gs).unwrap();
        let gpus = gs["gpus"].as_array().unwrap();
        assert_eq!(
            dump["devices"].as_array().unwrap().len(),
            scenario.devices.len()
        );
        assert_eq!(gpus.len(), scenario.devices.len());
        for (i, d) in scenario.devices.iter().enumerate() {
            let py = &dump["devices"][i];
            let g = &gpus[i];
            let own_pid = |p: &nvml_sim::scenario::Process| match p.pid {
                nvml_sim::scenario::Pid::SelfPid => py_pid,
                nvml_sim::scenario::Pid::Id(n) => n,
            };
            let mig_used: u64 = d
                .mig
                .iter()
                .map(|m| m.memory_used.0 + m.processes.iter().map(|p| p.used_memory.0).sum::<u64>())
                .sum();
            let used = d.memory_used.0
                + d.processes.iter().map(|p| p.used_memory.0).sum::<u64>()
                + mig_used;
            assert_eq!(py["name"], d.name.as_str());
            assert_eq!(py["uuid"], d.uuid.as_str());
            assert_eq!(py["bus_id"], d.pci_bus_id.as_str());
            assert_eq!(py["memory"]["total"], d.memory_total.0);
            assert_eq!(py["memory"]["used"], used);
            assert_eq!(py["memory"]["reserved"], d.memory_reserved.0);
            assert_eq!(g["uuid"], d.uuid.as_str());
            assert_eq!(g["name"], d.name.as_str());
            assert_eq!(g["memory.total"], d.memory_total.0 / MIB);
            assert_eq!(g["memory.used"], used / MIB);
            assert_eq!(
                g["power.draw"],
                u64::from(d.power_usage_mw.fixed().unwrap() / 1000)
            );
            if d.mig_mode {
                // A GPU in MIG mode has no device utilisation (NOT_SUPPORTED, as in NVML).
                assert_eq!(
                    g["utilization.gpu"],
                    serde_json::Value::Null,
                    "{name} GPU {i}"
                );
            } else {
                assert_eq!(g["utilization.gpu"], d.utilization_gpu.fixed().unwrap());
            }
            // pynvml sees every listed process (MIG ones through the parent too).
            let mut want: Vec<(u64, u64)> = d
                .processes
                .iter()
                .chain(d.mig.iter().flat_map(|m| &m.processes))
                .map(|p| (u64::from(own_pid(p)), p.used_memory.0))
                .collect();
            let mut got: Vec<(u64, u64)> = py["compute"]
                .as_array()
                .unwrap()
                .iter()
                .chain(py["graphics"].as_array().unwrap())
                .map(|p| (p["pid"].as_u64().unwrap(), p["used"].as_u64().unwrap()))
                .collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "{name} GPU {i} processes");
            // gpustat drops pids that do not exist on this machine; "self" is its own process.
            for p in g["processes"].as_array().unwrap() {
                let pid = p["pid"].as_u64().unwrap();
                let listed = d.processes.iter().any(|q| match q.pid {
                    nvml_sim::scenario::Pid::SelfPid => true,
                    nvml_sim::scenario::Pid::Id(n) => u64::from(n) == pid,
                });
                assert!(listed, "gpustat shows pid {pid} the scenario does not list");
            }
            assert_eq!(py["mig"].as_array().unwrap().len(), d.mig.len());
            for (j, m) in d.mig.iter().enumerate() {
                let pm = &py["mig"][j];
                assert_eq!(pm["uuid"], m.uuid.as_str());
                assert_eq!(pm["gi"], m.gpu_instance_id);
                assert_eq!(pm["ci"], m.compute_instance_id);
                assert_eq!(pm["memory"]["total"], m.memory_total.0);
                assert_eq!(pm["compute"].as_array().unwrap().len(), m.processes.len());
            }
        }
        if name == "8gpu" {
            let shown: Vec<u64> = gpus[1]["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["pid"].as_u64().unwrap())
                .collect();
            assert_eq!(
                shown.len(),
                1,
                "gpustat shows its own process (pid \"self\") on GPU 1"
            );
        }
    }
}

#[test]
fn python_sees_init_failures_and_one_line_scenario_errors() {
    if python().is_none() {
        println!("note: skipping the pynvml init-failure check: no python");
        return;
    }
    let (out, _) = run_python("nodriver", &[&dump_script()]);
    assert!(out.contains("\"init_error\": 9"), "{out}");
    let dir = temp_dir("bad");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[devices]]\nmemory_total = \"lots\"\n").unwrap();
    let (out, err) = run_python(bad.to_str().unwrap(), &[&dump_script()]);
    assert!(out.contains("\"init_error\": 999"), "{out}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("nvml-sim:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(bad.to_str().unwrap()) && lines[0].contains("lots"),
        "{}",
        lines[0]
    );
    let (gs, _) = run_python("nodevices", &["-m", "gpustat", "--json"]);
    assert!(gs.contains("\"gpus\": []"), "{gs}");
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- the queries monitors make: BAR1, PCIe, thresholds, NVLink, fields, per-process use -------

/// Calls `name(device, a, out)` for a query taking one unsigned argument and one out-pointer.
fn uint_arg(name: &str, h: Dev, a: c_uint) -> Result<u32, u32> {
    let mut v: c_uint = 0;
    // SAFETY: `v` is a valid out-pointer; the signature is the one in nvml.h.
    let rc =
        unsafe { sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint) -> u32>(name)(h, a, &mut v) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(rc)
    }
}

fn ull(name: &str, h: Dev) -> Result<u64, u32> {
    let mut v: c_ulonglong = 0;
    // SAFETY: `v` is a valid out-pointer; the signature is the one in nvml.h.
    let rc = unsafe { sym::<unsafe extern "C" fn(Dev, *mut c_ulonglong) -> u32>(name)(h, &mut v) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(rc)
    }
}

/// Calls `name(device, null)` (or with two null out-pointers when `two`).
fn with_null(name: &str, h: Dev, two: bool) -> u32 {
    // SAFETY: null out-pointers are what is being tested; the simulator checks them.
    unsafe {
        if two {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint) -> u32>(name)(
                h,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        } else {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint) -> u32>(name)(h, std::ptr::null_mut())
        }
    }
}

fn bar1(h: Dev) -> Result<nvmlBAR1Memory_t, u32> {
    let mut b = nvmlBAR1Memory_t {
        bar1Total: 0,
        bar1Free: 0,
        bar1Used: 0,
    };
    // SAFETY: `b` is a valid out-struct.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut nvmlBAR1Memory_t) -> u32>(
            "nvmlDeviceGetBAR1MemoryInfo",
        )(h, &mut b)
    };
    if rc == 0 {
        Ok(b)
    } else {
        Err(rc)
    }
}

/// `nvmlDeviceGetProcessUtilization` with room for `cap` samples (a null buffer when `cap` is
/// `None`): (rc, count written back, samples).
fn process_utilization(
    h: Dev,
    cap: Option<u32>,
    last_seen: u64,
) -> (u32, u32, Vec<nvmlProcessUtilizationSample_t>) {
    let zero = nvmlProcessUtilizationSample_t {
        pid: 0,
        timeStamp: 0,
        smUtil: 0,
        memUtil: 0,
        encUtil: 0,
        decUtil: 0,
    };
    let mut buf = vec![zero; cap.unwrap_or(0) as usize];
    let mut count = cap.unwrap_or(0);
    let p = if cap.is_some() {
        buf.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: `buf` holds `count` samples, or `p` is null.
    let rc = unsafe {
        sym::<
            unsafe extern "C" fn(
                Dev,
                *mut nvmlProcessUtilizationSample_t,
                *mut c_uint,
                c_ulonglong,
            ) -> u32,
        >("nvmlDeviceGetProcessUtilization")(h, p, &mut count, last_seen)
    };
    buf.truncate(if rc == 0 { count as usize } else { 0 });
    (rc, count, buf)
}

fn fields(h: Dev, asks: &[(u32, u32)]) -> (u32, Vec<nvmlFieldValue_t>) {
    let mut v: Vec<nvmlFieldValue_t> = asks
        .iter()
        .map(|&(id, scope)| nvmlFieldValue_t {
            fieldId: id,
            scopeId: scope,
            timestamp: 0,
            latencyUsec: 0,
            valueType: 0,
            nvmlReturn: 0,
            value: nvmlValue_t { ullVal: 0 },
        })
        .collect();
    // SAFETY: `v` holds `asks.len()` entries.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, std::ffi::c_int, *mut nvmlFieldValue_t) -> u32>(
            "nvmlDeviceGetFieldValues",
        )(h, asks.len() as std::ffi::c_int, v.as_mut_ptr())
    };
    (rc, v)
}

fn scenario_file(tag: &str, text: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(tag);
    let path = dir.join("s.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn monitor_queries_answer_from_the_model_and_the_scenario() {
    let _s = session("default");
    let h = handle(0);
    let b = bar1(h).unwrap();
    assert_eq!((b.bar1Total, b.bar1Used), (128 << 30, 1 << 20));
    assert_eq!(b.bar1Free, b.bar1Total - b.bar1Used);
    for (name, want) in [
        ("nvmlDeviceGetMaxPcieLinkGeneration", 5),
        ("nvmlDeviceGetGpuMaxPcieLinkGeneration", 5),
        ("nvmlDeviceGetCurrPcieLinkGeneration", 5),
        ("nvmlDeviceGetMaxPcieLinkWidth", 16),
        ("nvmlDeviceGetCurrPcieLinkWidth", 16),
        ("nvmlDeviceGetPcieLinkMaxSpeed", 32_000),
        ("nvmlDeviceGetPcieReplayCounter", 0),
        ("nvmlDeviceGetArchitecture", 9),
        ("nvmlDeviceGetBusType", 2),
        ("nvmlDeviceGetPowerManagementDefaultLimit", 700_000),
    ] {
        assert_eq!(uint(name, h), Ok(want), "{name}");
    }
    assert_eq!(uint_arg("nvmlDeviceGetPcieThroughput", h, 0), Ok(1_200));
    assert_eq!(uint_arg("nvmlDeviceGetPcieThroughput", h, 1), Ok(900));
    assert_eq!(uint_arg("nvmlDeviceGetPcieThroughput", h, 2), Err(2));
    assert_eq!(uint_arg("nvmlDeviceGetTemperatureThreshold", h, 0), Ok(92));
    assert_eq!(uint_arg("nvmlDeviceGetTemperatureThreshold", h, 1), Ok(89));
    assert_eq!(uint_arg("nvmlDeviceGetTemperatureThreshold", h, 3), Ok(87));
    assert_eq!(
        uint_arg("nvmlDeviceGetTemperatureThreshold", h, 4),
        Err(3),
        "acoustic thresholds are not supported"
    );
    assert_eq!(uint_arg("nvmlDeviceGetTemperatureThreshold", h, 99), Err(2));
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkState", h, 17), Ok(1));
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkState", h, 18), Err(2));
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkVersion", h, 0), Ok(4));
    let (mut cur, mut pending) = (7, 7);
    for name in ["nvmlDeviceGetDriverModel", "nvmlDeviceGetDriverModel_v2"] {
        // SAFETY: valid out-pointers.
        let rc = unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint) -> u32>(name)(
                h,
                &mut cur,
                &mut pending,
            )
        };
        assert_eq!(rc, 3, "{name}: WDDM/TCC exist on Windows only");
    }
    // Energy since boot only grows; the default GPU idles, so its clocks say GpuIdle.
    let e1 = ull("nvmlDeviceGetTotalEnergyConsumption", h).unwrap();
    let e2 = ull("nvmlDeviceGetTotalEnergyConsumption", h).unwrap();
    assert!(e1 > 0 && e2 >= e1, "{e1} {e2}");
    assert_eq!(ull("nvmlDeviceGetCurrentClocksEventReasons", h), Ok(1));
    assert_eq!(ull("nvmlDeviceGetCurrentClocksThrottleReasons", h), Ok(1));
    assert_eq!(
        ull("nvmlDeviceGetSupportedClocksEventReasons", h),
        Ok(0x1FF)
    );
    let (mut lo, mut hi) = (0, 0);
    // SAFETY: valid out-pointers.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint) -> u32>(
            "nvmlDeviceGetPowerManagementLimitConstraints",
        )(h, &mut lo, &mut hi)
    };
    assert_eq!((rc, lo, hi), (0, 200_000, 700_000));
    // Hopper remaps rows; it does not retire pages.
    let mut rows = [9u32; 4];
    let [a, b2, c, d] = &mut rows;
    // SAFETY: four valid out-pointers.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint, *mut c_uint, *mut c_uint) -> u32>(
            "nvmlDeviceGetRemappedRows",
        )(h, a, b2, c, d)
    };
    assert_eq!((rc, rows), (0, [0; 4]));
    assert_eq!(
        uint("nvmlDeviceGetRetiredPagesPendingStatus", h),
        Err(3),
        "no page retirement on Hopper"
    );
    assert_eq!(
        string("nvmlDeviceGetVbiosVersion", h).unwrap(),
        "96.00.74.00.01"
    );
    let (rc, v) = fields(
        h,
        &[
            (field::NVLINK_LINK_COUNT, 0),
            (field::TOTAL_ENERGY_CONSUMPTION, 0),
            (9999, 0),
            (field::NVLINK_THROUGHPUT_DATA_TX, 0),
            (field::NVLINK_THROUGHPUT_DATA_RX, 18),
        ],
    );
    assert_eq!(rc, 0, "the call succeeds, each entry says how it went");
    let rcs: Vec<u32> = v.iter().map(|f| f.nvmlReturn).collect();
    assert_eq!(rcs, vec![0, 0, 3, 0, 2]);
    // SAFETY: the simulator wrote these fields as the value types it reports.
    unsafe {
        assert_eq!(v[0].value.uiVal, 18);
        assert!(v[1].value.ullVal >= e2);
    }
    assert_eq!((v[0].valueType, v[1].valueType), (1, 3));
    assert!(v.iter().all(|f| f.timestamp > 0));
}

#[test]
fn monitor_queries_reject_null_pointers_and_short_buffers() {
    let _s = session("8gpu");
    let h = handle(4); // four processes
    for name in [
        "nvmlDeviceGetBAR1MemoryInfo",
        "nvmlDeviceGetMaxPcieLinkGeneration",
        "nvmlDeviceGetCurrPcieLinkWidth",
        "nvmlDeviceGetArchitecture",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetCurrentClocksEventReasons",
    ] {
        assert_eq!(with_null(name, h, false), 2, "{name}");
    }
    for name in [
        "nvmlDeviceGetDriverModel",
        "nvmlDeviceGetDriverModel_v2",
        "nvmlDeviceGetPowerManagementLimitConstraints",
    ] {
        assert_eq!(with_null(name, h, true), 2, "{name}");
    }
    // SAFETY: null out-pointers are what is being tested.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint) -> u32>(
            "nvmlDeviceGetTemperatureThreshold",
        )(h, 0, std::ptr::null_mut())
    };
    assert_eq!(rc, 2);
    // SAFETY: as above.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, std::ffi::c_int, *mut nvmlFieldValue_t) -> u32>(
            "nvmlDeviceGetFieldValues",
        )(h, 1, std::ptr::null_mut())
    };
    assert_eq!(rc, 2);
    // SAFETY: a negative count is rejected before the (null) buffer is touched.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, std::ffi::c_int, *mut nvmlFieldValue_t) -> u32>(
            "nvmlDeviceGetFieldValues",
        )(h, -1, std::ptr::null_mut())
    };
    assert_eq!(rc, 2);

    // Per-process utilisation: the NVML size protocol.
    // SAFETY: a null count pointer is what is being tested.
    let rc = unsafe {
        sym::<
            unsafe extern "C" fn(
                Dev,
                *mut nvmlProcessUtilizationSample_t,
                *mut c_uint,
                c_ulonglong,
            ) -> u32,
        >("nvmlDeviceGetProcessUtilization")(
            h, std::ptr::null_mut(), std::ptr::null_mut(), 0
        )
    };
    assert_eq!(rc, 2);
    assert_eq!(
        process_utilization(h, None, 0).0,
        7,
        "null buffer: INSUFFICIENT_SIZE"
    );
    assert_eq!(
        process_utilization(h, None, 0).1,
        4,
        "with the needed count"
    );
    assert_eq!(process_utilization(h, Some(2), 0).0, 7);
    assert_eq!(process_utilization(h, Some(2), 0).1, 4);
    // A busy GPU runs at its maximum clocks in P0, an idle one at its idle clocks.
    assert_eq!(uint_arg("nvmlDeviceGetClockInfo", h, 0), Ok(1980));
    assert_eq!(uint_arg("nvmlDeviceGetClockInfo", h, 2), Ok(2619));
    assert_eq!(uint("nvmlDeviceGetPerformanceState", h), Ok(0));
    assert_eq!(uint_arg("nvmlDeviceGetClockInfo", handle(2), 1), Ok(345));
    let (rc, n, samples) = process_utilization(h, Some(8), 0);
    assert_eq!((rc, n), (0, 4));
    let mut pids: Vec<u32> = samples.iter().map(|s| s.pid).collect();
    pids.sort_unstable();
    assert_eq!(pids, vec![40010, 40011, 40012, 40013]);
    let total: u32 = samples.iter().map(|s| s.smUtil).sum();
    assert!(
        total <= 45,
        "the processes share the GPU's 45%: {samples:?}"
    );
    let tick = samples[0].timeStamp;
    assert!(samples.iter().all(|s| s.timeStamp == tick));
    assert_eq!(
        process_utilization(h, Some(8), u64::MAX).0,
        6,
        "nothing newer than the last sample seen: NOT_FOUND"
    );
    assert_eq!(
        process_utilization(handle(2), Some(8), 0).0,
        6,
        "no processes: NOT_FOUND"
    );
    let mut small = [0 as c_char; 4];
    // SAFETY: `small` holds 4 bytes and we say so.
    let rc =
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_char, c_uint) -> u32>(
                "nvmlDeviceGetVbiosVersion",
            )(h, small.as_mut_ptr(), 4)
        };
    assert_eq!(rc, 7);
}

#[test]
fn models_fill_what_the_scenario_leaves_out() {
    let (dir, path) = scenario_file(
        "models",
        r#"
        [[devices]]
        name = "NVIDIA GeForce RTX 4090"
        [[devices]]
        name = "Tesla V100-SXM2-32GB"
        ecc = { enabled = true, retired_pages_single_bit = 3 }
        [[devices]]
        name = "NVIDIA A100-SXM4-80GB"
        max_clocks = { graphics = 1200 }
        "#,
    );
    let _s = session(path.to_str().unwrap());
    let (geforce, volta, a100) = (handle(0), handle(1), handle(2));
    // A GeForce: fans, no ECC, no MIG, an idle PCIe link at generation 1, a 256 MiB BAR1.
    assert_eq!(uint("nvmlDeviceGetFanSpeed", geforce), Ok(30));
    assert_eq!(uint("nvmlDeviceGetNumFans", geforce), Ok(2));
    assert_eq!(uint("nvmlDeviceGetBrand", geforce), Ok(5));
    assert_eq!(with_null("nvmlDeviceGetEccMode", geforce, true), 3);
    let (mut cur, mut pending) = (0, 0);
    // SAFETY: valid out-pointers.
    let rc =
        unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut c_uint, *mut c_uint) -> u32>(
                "nvmlDeviceGetMigMode",
            )(geforce, &mut cur, &mut pending)
        };
    assert_eq!(rc, 3, "a GeForce has no MIG");
    assert_eq!(uint_arg("nvmlDeviceGetMaxClockInfo", geforce, 0), Ok(3120));
    assert_eq!(
        uint_arg("nvmlDeviceGetClockInfo", geforce, 0),
        Ok(210),
        "idle clocks"
    );
    assert_eq!(
        uint("nvmlDeviceGetPerformanceState", geforce),
        Ok(8),
        "idle in P8"
    );
    assert_eq!(uint("nvmlDeviceGetCurrPcieLinkGeneration", geforce), Ok(1));
    assert_eq!(uint("nvmlDeviceGetMaxPcieLinkGeneration", geforce), Ok(4));
    assert_eq!(bar1(geforce).unwrap().bar1Total, 256 << 20);
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkState", geforce, 0), Err(3));
    assert_eq!(
        uint("nvmlDeviceGetEnforcedPowerLimit", geforce),
        Ok(450_000)
    );
    // A V100 retires pages (and reports them through the list protocol); it has no row remapping.
    let mut n: c_uint = 0;
    let mut pages = [0u64; 3];
    let retired = |n: &mut c_uint, out: *mut c_ulonglong| {
        // SAFETY: `out` is null or holds `*n` entries.
        unsafe {
            sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint, *mut c_ulonglong) -> u32>(
                "nvmlDeviceGetRetiredPages",
            )(volta, 0, n, out)
        }
    };
    assert_eq!(retired(&mut n, std::ptr::null_mut()), 7);
    assert_eq!(n, 3);
    n = 1;
    assert_eq!(retired(&mut n, pages.as_mut_ptr()), 7);
    n = 3;
    assert_eq!(retired(&mut n, pages.as_mut_ptr()), 0);
    assert!(pages[0] != pages[1] && pages[1] != pages[2]);
    // SAFETY: a null count is what is being tested.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(Dev, c_uint, *mut c_uint, *mut c_ulonglong) -> u32>(
            "nvmlDeviceGetRetiredPages",
        )(volta, 0, std::ptr::null_mut(), std::ptr::null_mut())
    };
    assert_eq!(rc, 2);
    assert_eq!(
        with_null("nvmlDeviceGetRemappedRows", volta, true),
        3,
        "no row remapping before Ampere"
    );
    assert_eq!(uint("nvmlDeviceGetArchitecture", volta), Ok(5));
    // An A100 has its clocks and 12 NVLinks; what the scenario states wins key by key.
    assert_eq!(uint_arg("nvmlDeviceGetMaxClockInfo", a100, 0), Ok(1200));
    assert_eq!(uint_arg("nvmlDeviceGetMaxClockInfo", a100, 2), Ok(1593));
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkState", a100, 11), Ok(1));
    assert_eq!(uint_arg("nvmlDeviceGetNvLinkState", a100, 12), Err(2));
    assert_eq!(uint("nvmlDeviceGetEnforcedPowerLimit", a100), Ok(400_000));
    assert_eq!(bar1(a100).unwrap().bar1Total, 128 << 30);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn live_values_move_within_their_ranges() {
    let scenario = Scenario::bundled("live").unwrap();
    let _s = session("live");
    let h = handle(0);
    let d = &scenario.devices[0];
    let seed = nvml_sim::state::device_seed(0);
    for _ in 0..5 {
        let t0 = nvml_sim::series::now_us();
        let mut u = nvmlUtilization_t { gpu: 0, memory: 0 };
        // SAFETY: valid out-struct.
        let rc = unsafe {
            sym::<unsafe extern "C" fn(Dev, *mut nvmlUtilization_t) -> u32>(
                "nvmlDeviceGetUtilizationRates",
            )(h, &mut u)
        };
        let t1 = nvml_sim::series::now_us();
        assert_eq!(rc, 0);
        // What the simulator answers is the range's value at the time of the call.
        let (a, b) = (
            d.utilization_gpu.at(nvml_sim::series::secs(t0), seed),
            d.utilization_gpu.at(nvml_sim::series::secs(t1), seed),
        );
        assert!(
            (a.min(b)..=a.max(b)).contains(&u.gpu),
            "{} not between {a} and {b}",
            u.gpu
        );
        assert!((35..=95).contains(&u.gpu) && (15..=45).contains(&u.memory));
        let (rc, _, samples) = process_utilization(h, Some(4), 0);
        assert_eq!(rc, 0);
        assert_eq!(samples.len(), 2);
        assert!(samples.iter().map(|s| s.smUtil).sum::<u32>() <= 95);
    }
    // The stated per-process encoder use of the GeForce's ffmpeg is within its bounds.
    let (rc, _, samples) = process_utilization(handle(1), Some(4), 0);
    assert_eq!(rc, 0);
    let ffmpeg = samples.iter().find(|s| s.pid == 42101).unwrap();
    assert!((10..=40).contains(&ffmpeg.encUtil), "{ffmpeg:?}");
}

#[test]
fn a_frozen_clock_holds_every_value() {
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    while call0("nvmlShutdown") == 0 {}
    // The variable is read at the first nvmlInit, under the lock every session holds.
    std::env::set_var(nvml_sim::state::CLOCK_ENV, "1700000000.25");
    set_scenario(Some("live"));
    assert_eq!(call0("nvmlInit_v2"), 0);
    let scenario = Scenario::bundled("live").unwrap();
    let want = scenario.devices[0]
        .power_usage_mw
        .at(1_700_000_000.25, nvml_sim::state::device_seed(0));
    for _ in 0..3 {
        assert_eq!(uint("nvmlDeviceGetPowerUsage", handle(0)), Ok(want));
    }
    let (rc, _, samples) = process_utilization(handle(0), Some(4), 0);
    assert_eq!(rc, 0);
    assert!(samples.iter().all(|s| s.timeStamp == 1_700_000_000_200_000));
    let e = ull("nvmlDeviceGetTotalEnergyConsumption", handle(0)).unwrap();
    assert_eq!(ull("nvmlDeviceGetTotalEnergyConsumption", handle(0)), Ok(e));
    while call0("nvmlShutdown") == 0 {}
    std::env::remove_var(nvml_sim::state::CLOCK_ENV);
    set_scenario(None);
    drop(guard);
}

#[test]
fn event_sets_receive_the_scenario_xids() {
    let (dir, path) = scenario_file(
        "events",
        r#"
        [[devices]]
        [[devices]]
        xid_events = [{ after_ms = 0, xid = 48 }, { after_ms = 50, xid = 79 }]
        [[devices]]
        name = "NVIDIA GeForce RTX 4090"
        "#,
    );
    let _s = session(path.to_str().unwrap());
    type Set = *mut c_void;
    let create = sym::<unsafe extern "C" fn(*mut Set) -> u32>("nvmlEventSetCreate");
    let register =
        sym::<unsafe extern "C" fn(Dev, c_ulonglong, Set) -> u32>("nvmlDeviceRegisterEvents");
    let wait = sym::<unsafe extern "C" fn(Set, *mut nvmlEventData_t, c_uint) -> u32>(
        "nvmlEventSetWait_v2",
    );
    let free = sym::<unsafe extern "C" fn(Set) -> u32>("nvmlEventSetFree");
    // SAFETY: a null out-pointer is what is being tested.
    assert_eq!(unsafe { create(std::ptr::null_mut()) }, 2);
    let mut set: Set = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { create(&mut set) }, 0);
    assert_eq!(ull("nvmlDeviceGetSupportedEventTypes", handle(1)), Ok(0x1F));
    assert_eq!(
        ull("nvmlDeviceGetSupportedEventTypes", handle(2)),
        Ok(0x1C),
        "no ECC events without ECC"
    );
    // SAFETY: `set` came from nvmlEventSetCreate.
    unsafe {
        assert_eq!(
            register(handle(2), 1, set),
            3,
            "single-bit ECC on a GeForce"
        );
        assert_eq!(register(handle(0), 8, set), 0);
        assert_eq!(register(handle(1), 8, set), 0);
        assert_eq!(register(handle(1), 8, 0x77 as Set), 2, "not a set");
    }
    let mut data = nvmlEventData_t {
        device: std::ptr::null_mut(),
        eventType: 0,
        eventData: 0,
        gpuInstanceId: 0,
        computeInstanceId: 0,
    };
    // SAFETY: `set` is live and `data` a valid out-struct (or null, where that is tested).
    unsafe {
        assert_eq!(wait(set, std::ptr::null_mut(), 0), 2);
        assert_eq!(wait(set, &mut data, 0), 0);
        assert_eq!(
            (data.device, data.eventType, data.eventData),
            (handle(1), 8, 48)
        );
        assert_eq!(data.gpuInstanceId, u32::MAX);
        // The second XID comes 50 ms after the registration; the wait lasts until then.
        assert_eq!(wait(set, &mut data, 10_000), 0);
        assert_eq!(data.eventData, 79);
        assert_eq!(
            wait(set, &mut data, 20),
            10,
            "nothing more: NVML_ERROR_TIMEOUT"
        );
        assert_eq!(free(set), 0);
        assert_eq!(free(set), 2);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn samples_clocks_and_sizes() {
    let scenario = Scenario::bundled("live").unwrap();
    let _s = session("live");
    let h = handle(0);
    assert_eq!(uint("nvmlDeviceGetMemoryBusWidth", h), Ok(5120));
    assert_eq!(uint("nvmlDeviceGetNumGpuCores", h), Ok(16896));
    assert_eq!(uint("nvmlDeviceGetNumGpuCores", handle(1)), Ok(16384));
    let clock_id = |id: c_uint| {
        let mut v: c_uint = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe {
            sym::<unsafe extern "C" fn(Dev, c_uint, c_uint, *mut c_uint) -> u32>(
                "nvmlDeviceGetClock",
            )(h, 0, id, &mut v)
        };
        (rc, v)
    };
    assert_eq!(clock_id(0), (0, 1755), "the scenario's current clock");
    assert_eq!(clock_id(3), (0, 1980), "the boost maximum");
    assert_eq!(clock_id(9).0, 2);
    assert_eq!(uint_arg("nvmlDeviceGetApplicationsClock", h, 0), Ok(1980));
    type Samples = unsafe extern "C" fn(
        Dev,
        c_uint,
        c_ulonglong,
        *mut c_uint,
        *mut c_uint,
        *mut nvmlSample_t,
    ) -> u32;
    let get = sym::<Samples>("nvmlDeviceGetSamples");
    let (mut ty, mut n) = (9, 0);
    // SAFETY: valid out-pointers and a null buffer: how many samples there are.
    let rc = unsafe { get(h, 1, 0, &mut ty, &mut n, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    assert_eq!((ty, n), (1, 120), "unsigned ints, the last 12 s");
    // SAFETY: null count is what is being tested.
    let rc = unsafe { get(h, 1, 0, &mut ty, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(rc, 2);
    let zero = nvmlSample_t {
        timeStamp: 0,
        sampleValue: nvmlValue_t { ullVal: 0 },
    };
    let mut buf = vec![zero; 10];
    n = 10;
    // SAFETY: `buf` holds `n` samples.
    let rc = unsafe { get(h, 1, 0, &mut ty, &mut n, buf.as_mut_ptr()) };
    assert_eq!(rc, 0);
    assert_eq!(n, 10, "the newest 10");
    let d = &scenario.devices[0];
    for w in buf.windows(2) {
        assert_eq!(w[1].timeStamp - w[0].timeStamp, 100_000);
    }
    for sample in &buf {
        // SAFETY: utilisation samples are unsigned ints.
        let v = unsafe { sample.sampleValue.uiVal };
        let want = d.utilization_gpu.at(
            nvml_sim::series::secs(sample.timeStamp),
            nvml_sim::state::device_seed(0),
        );
        assert_eq!(v, want, "the value at the sample's time");
    }
    // Nothing newer than the newest sample: NOT_FOUND.
    let newest = buf[9].timeStamp;
    n = 10;
    // SAFETY: as above.
    let rc = unsafe { get(h, 1, newest, &mut ty, &mut n, buf.as_mut_ptr()) };
    assert_eq!(rc, 6);
    // SAFETY: as above.
    let rc = unsafe { get(h, 99, 0, &mut ty, &mut n, buf.as_mut_ptr()) };
    assert_eq!(rc, 2);
}

#[test]
fn device_nodes_enumerate_only_the_gpus_whose_node_opens() {
    if std::env::var_os("NVML_SIM_DEVICE_NODES").is_some() {
        return; // the environment's pattern would replace the scenario's
    }
    let dir = temp_dir("nodes");
    // GPU 1's and GPU 3's nodes are missing (a container given two GPUs): NVML lists 0 and 2
    // as its devices 0 and 1.
    for n in [0, 2] {
        std::fs::write(dir.join(format!("nvidia{n}")), "").unwrap();
    }
    let path = dir.join("s.toml");
    std::fs::write(
        &path,
        format!(
            "device_nodes = {:?}\ndevices = [{{}}, {{}}, {{}}, {{}}]\n",
            format!("{}/nvidia{{minor}}", dir.display())
        ),
    )
    .unwrap();
    let loaded = Scenario::load(&path).unwrap();
    let _s = session(path.to_str().unwrap());
    let mut n = 0;
    // SAFETY: valid out-pointer.
    let rc =
        unsafe { sym::<unsafe extern "C" fn(*mut c_uint) -> u32>("nvmlDeviceGetCount_v2")(&mut n) };
    assert_eq!((rc, n), (0, 2));
    for (index, gpu) in [(0u32, 0usize), (1, 2)] {
        let h = handle(index);
        assert_eq!(
            string("nvmlDeviceGetUUID", h),
            Ok(loaded.devices[gpu].uuid.clone())
        );
        assert_eq!(uint("nvmlDeviceGetIndex", h), Ok(index));
        assert_eq!(uint("nvmlDeviceGetMinorNumber", h), Ok(gpu as u32));
    }
    let mut h: Dev = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(c_uint, *mut Dev) -> u32>("nvmlDeviceGetHandleByIndex_v2")(
            2, &mut h,
        )
    };
    assert_eq!(
        rc, 2,
        "NVML_ERROR_INVALID_ARGUMENT past the enumerated GPUs"
    );
    let hidden = CString::new(loaded.devices[1].uuid.clone()).unwrap();
    // SAFETY: a NUL-terminated string and a valid out-pointer.
    let rc = unsafe {
        sym::<unsafe extern "C" fn(*const c_char, *mut Dev) -> u32>("nvmlDeviceGetHandleByUUID")(
            hidden.as_ptr(),
            &mut h,
        )
    };
    assert_eq!(rc, 6, "NVML_ERROR_NOT_FOUND for a GPU NVML does not list");
    std::fs::remove_dir_all(dir).unwrap();
}
