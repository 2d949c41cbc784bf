//! GPU-aware pools on the NVML simulator: workers get their GPUs in CUDA_VISIBLE_DEVICES,
//! see them through `gpu::assigned()`, and their GPU memory is sampled by pid.
//!
//! Each test body runs in a spawned process whose environment points NVML at the simulator
//! before anything reads it (NVML is opened once per process).

use std::collections::BTreeMap;
use std::path::PathBuf;

use gpuproc::{Pool, Process, StartMethod};

use crate::support::TIMEOUT;

fn sim_env(scenario: &str) -> Vec<(String, String)> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let lib = nvml_sim::library_path().expect("the NVML simulator is built");
    // A lease table of its own, so tests running side by side do not see each other's.
    let runtime = std::env::temp_dir().join(format!("gpuproc-pool-gpu-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    vec![
        (
            "GPUPROC_NVML_LIB".into(),
            lib.to_string_lossy().into_owned(),
        ),
        ("NVML_SIM_SCENARIO".into(), scenario.into()),
        (
            "GPUPROC_RUNTIME_DIR".into(),
            runtime.to_string_lossy().into_owned(),
        ),
    ]
}

fn in_sim<A, R>(scenario: &str, extra: &[(&str, &str)], f: fn(A) -> R, a: A) -> R
where
    A: serde::Serialize + serde::de::DeserializeOwned,
    R: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut p = Process::new(f, a).with_start_method(StartMethod::Spawn);
    let extra = extra.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    for (k, v) in sim_env(scenario).into_iter().chain(extra) {
        p = p.with_env(k, v);
    }
    p.start().unwrap();
    p.join_timeout(TIMEOUT).unwrap()
}

/// `f(())` in the simulator's 4-GPU scenario, with a state directory of its own (named
/// after `name`) where processes record simulated GPU memory.
fn in_sim_with_state<R>(name: &str, f: fn(()) -> R) -> R
where
    R: serde::Serialize + serde::de::DeserializeOwned,
{
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_str = dir.to_string_lossy().into_owned();
    let got = in_sim("4gpu", &[("NVML_SIM_STATE_DIR", &dir_str)], f, ());
    let _ = std::fs::remove_dir_all(&dir);
    got
}

/// In a worker: the UUIDs `gpu::assigned()` reports, and the raw variable.
fn my_gpus(_: u32) -> (Vec<String>, String) {
    let assigned = gpuproc::gpu::assigned().map_err(|e| e.to_string()).unwrap();
    let uuids = assigned
        .devices
        .iter()
        .map(|d| d.device.uuid.clone().unwrap_or_default())
        .collect();
    (
        uuids,
        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default(),
    )
}

fn eight_workers_two_per_gpu(_: ()) -> BTreeMap<String, usize> {
    let pool = Pool::builder()
        .processes(8)
        .workers_per_gpu(2)
        .build()
        .unwrap();
    // One task per worker: a chunk of one, eight tasks, with a barrier-free check that every
    // worker answered by collecting distinct pids.
    let mut per_gpu = BTreeMap::new();
    let mut seen_pids = std::collections::BTreeSet::new();
    for u in pool.gpu_usage().unwrap() {
        assert_eq!(u.devices.len(), 1, "{u:?}");
        *per_gpu.entry(u.devices[0].clone()).or_insert(0) += 1;
        seen_pids.insert(u.pid);
    }
    assert_eq!(seen_pids.len(), 8);
    for (uuids, var) in pool.map_chunksize(my_gpus, 0..64u32, 1).unwrap() {
        assert_eq!(uuids.len(), 1, "{var}");
        assert_eq!(var, uuids[0], "CUDA_VISIBLE_DEVICES holds the full UUID");
        assert!(per_gpu.contains_key(&uuids[0]));
    }
    per_gpu
}

#[test]
fn eight_workers_on_four_gpus_land_two_per_gpu() {
    let per_gpu = in_sim("4gpu", &[], eight_workers_two_per_gpu, ());
    assert_eq!(per_gpu.len(), 4, "{per_gpu:?}");
    assert!(per_gpu.values().all(|&n| n == 2), "{per_gpu:?}");
}

/// Two pools in one program share the lease table: the second cannot take the first's GPUs.
fn two_pools_do_not_share(_: ()) -> (usize, String) {
    let a = Pool::builder()
        .processes(3)
        .gpus_per_worker(1)
        .build()
        .unwrap();
    let taken = a.gpu_usage().unwrap().len();
    let err = Pool::builder()
        .processes(2)
        .gpus_per_worker(1)
        .build()
        .unwrap_err();
    (taken, err.to_string())
}

#[test]
fn pools_lease_their_gpus() {
    let (taken, err) = in_sim("4gpu", &[], two_pools_do_not_share, ());
    assert_eq!(taken, 3);
    assert!(
        err.to_lowercase().contains("free") || err.contains("GPU"),
        "{err}"
    );
}

/// A worker "allocates" GPU memory the way the simulator sees it: a state file per pid.
fn allocate(mib: u64) -> u32 {
    let dir = PathBuf::from(std::env::var("NVML_SIM_STATE_DIR").unwrap());
    let gpu = gpuproc::gpu::assigned().unwrap().devices[0].device.index;
    // Aside and renamed, so the pool's sampler never reads it half written.
    nvml_sim::state::write_allocation(&dir, gpu, std::process::id(), mib << 20).unwrap();
    std::process::id()
}

fn sampled_memory(_: ()) -> Vec<(u32, u64, u64)> {
    let pool = Pool::builder()
        .processes(2)
        .gpus_per_worker(1)
        .gpu_sampling(std::time::Duration::from_millis(5))
        .build()
        .unwrap();
    let pids = pool.map_chunksize(allocate, [100u64, 300], 1).unwrap();
    let usage = pool.gpu_usage().unwrap();
    // Each worker's node, and its GPU by index and UUID with the memory it uses there.
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    for u in &usage {
        assert_eq!(u.node, node, "{u:?}");
        assert_eq!(u.gpus.len(), 1, "{u:?}");
        assert_eq!([u.gpus[0].uuid.clone()], *u.devices, "{u:?}");
        assert_eq!(u.gpus[0].memory, u.memory, "{u:?}");
    }
    usage
        .iter()
        .filter(|u| pids.contains(&u.pid))
        .map(|u| (u.pid, u.memory >> 20, u.peak_memory >> 20))
        .collect()
}

#[test]
fn worker_gpu_memory_is_read_by_pid() {
    let got = in_sim_with_state("gpuproc-sim-state", sampled_memory);
    let mut mibs: Vec<u64> = got.iter().map(|g| g.1).collect();
    mibs.sort();
    assert_eq!(mibs, [100, 300], "{got:?}");
    assert!(got.iter().all(|g| g.2 >= g.1));
}

/// The `4gpu` scenario's utilisation by UUID.
fn busy_percent(uuid: &str) -> u32 {
    match uuid {
        "GPU-0a4f2e61-3c1b-4d2e-9f00-1b2c3d4e5f60" => 12,
        "GPU-1b5f3f72-4d2c-4e3f-8a11-2c3d4e5f6071" => 57,
        "GPU-2c6a4a83-5e3d-4f4a-9b22-3d4e5f607182" => 0,
        "GPU-3d7b5b94-6f4e-4a5b-8c33-4e5f60718293" => 98,
        other => panic!("not a 4gpu UUID: {other}"),
    }
}

/// Each worker holds memory on its own GPU; the sampler's accounting is polled until every
/// worker has energy (two samples on its GPU), within the test's deadline.
fn sampled_accounting(_: ()) -> Vec<gpuproc::WorkerGpuUsage> {
    let pool = Pool::builder()
        .processes(2)
        .gpus_per_worker(1)
        .gpu_sampling(std::time::Duration::from_millis(5))
        .build()
        .unwrap();
    let pids = pool.map_chunksize(allocate, [100u64, 300], 1).unwrap();
    let end = gpuproc::time::deadline(TIMEOUT);
    loop {
        let usage: Vec<_> = pool
            .gpu_usage()
            .unwrap()
            .into_iter()
            .filter(|u| pids.contains(&u.pid))
            .collect();
        if usage.len() == 2 && usage.iter().all(|u| u.energy_mj.is_some()) {
            return usage;
        }
        assert!(
            gpuproc::time::remaining(end) != Some(std::time::Duration::ZERO),
            "no energy within {TIMEOUT:?}: {usage:?}"
        );
        // The sampler runs on the pool's thread; nothing here to block on.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn workers_are_accounted_by_the_sampler() {
    let got = in_sim_with_state("gpuproc-sim-acct", sampled_accounting);
    let mut means: Vec<u64> = got.iter().map(|u| u.mean_memory >> 20).collect();
    means.sort();
    // Sampled only once the memory was held, every sample saw all of it.
    assert_eq!(means, [100, 300], "{got:?}");
    for u in &got {
        assert_eq!(u.devices.len(), 1, "{u:?}");
        // Alone on its GPU, the worker has all of its utilisation.
        assert_eq!(
            u.mean_sm_percent,
            Some(busy_percent(&u.devices[0])),
            "{u:?}"
        );
    }
}

/// A task that holds `mib` of simulated GPU memory until told to go; returns its worker's
/// pid and GPU UUID.
fn allocate_and_wait((mib, go): (u64, gpuproc::Queue<()>)) -> (u32, String) {
    let uuid = gpuproc::gpu::assigned().unwrap().devices[0]
        .device
        .uuid
        .clone()
        .unwrap_or_default();
    let pid = allocate(mib);
    go.get_timeout(TIMEOUT).unwrap();
    (pid, uuid)
}

/// One task holding 200 MiB on its worker's GPU, accounted per task: the parent lets it end
/// once the worker's own accounting shows two samples on the GPU (energy), so the task's
/// has them too.
fn task_accounting(_: ()) -> ((u32, String), gpuproc::gpu::GpuAccounting, u64) {
    let pool = Pool::builder()
        .processes(1)
        .gpus_per_worker(1)
        .gpu_sampling(std::time::Duration::from_millis(5))
        .build()
        .unwrap();
    let go = gpuproc::Queue::new().unwrap();
    let mut it = pool.imap(allocate_and_wait, [(200u64, go.clone())]);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let end = gpuproc::time::deadline(TIMEOUT);
            loop {
                let usage = pool.gpu_usage().unwrap();
                if usage
                    .iter()
                    .any(|u| u.energy_mj.is_some() && u.mean_memory > 0)
                {
                    go.put(()).unwrap();
                    return;
                }
                assert!(
                    gpuproc::time::remaining(end) != Some(std::time::Duration::ZERO),
                    "no samples within {TIMEOUT:?}: {usage:?}"
                );
                // The sampler runs on the pool's thread; nothing here to block on.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        let got = it.next().unwrap().unwrap();
        waiter.join().unwrap();
        (
            got,
            it.last_gpu_accounting().clone(),
            it.last_gpu_memory_peak(),
        )
    })
}

#[test]
fn each_task_is_accounted_by_the_sampler() {
    let ((_, uuid), a, peak) = in_sim_with_state("gpuproc-sim-task", task_accounting);
    assert_eq!(peak, 200 << 20, "{a:?}");
    assert!(a.samples >= 2, "{a:?}");
    assert_eq!(a.peak_memory, Some(200 << 20), "{a:?}");
    assert_eq!(a.mean_memory, Some(200 << 20), "{a:?}");
    assert_eq!(
        a.mean_sm_percent.map(|p| p.round() as u32),
        Some(busy_percent(&uuid))
    );
    assert!(a.energy_mj.is_some() && !a.shared, "{a:?}");
    assert!(a.first_ms <= a.last_ms, "{a:?}");
}
