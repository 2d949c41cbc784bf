//! Leases: which GPUs have been handed out, recorded where every picker on the machine sees
//! them, so that two programs never pick the same GPU beyond its allowed share.
//!
//! # The table
//! One text file, `leases`, in the runtime directory ([`runtime_dir`]), replaced atomically
//! (written aside, then renamed) while holding an exclusive `flock` on `leases.lock`. Each
//! lease names its GPUs (full UUIDs), its share limit and its holders: processes identified
//! by PID *and* start time (from `/proc/PID/stat`), so a reused PID is not mistaken for the
//! holder. A lease whose holders have all exited (or that was written before the last boot)
//! is stale: every reader ignores it and the next writer drops it. So a lease vanishes when
//! its holder dies, however it dies.
//!
//! Leases coordinate the processes that share a runtime directory and a PID namespace: by
//! default those of one user on one machine. Point `GPUPROC_RUNTIME_DIR` at a directory the
//! members of a team can all write to, to coordinate them too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::host::{parse_stat, Proc};
use super::nvml::Gpus;
use super::pick::{select, Criteria, PickError, PickedDevice};
use super::visible::{parse_cuda_visible_devices, resolve_visible_devices, CudaDeviceOrder};
use crate::sys;

/// The environment variable naming the directory that holds the lease table.
pub const RUNTIME_DIR_ENV: &str = "GPUPROC_RUNTIME_DIR";

const TABLE: &str = "leases";
const LOCK: &str = "leases.lock";
const HEADER: &str = "# gpuproc GPU leases, format 1: one lease per line";
/// How long a picker waits for another to finish with the table before giving up. Pickers
/// hold the lock for a few milliseconds; only a stopped or hung process holds it longer.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between two looks at the GPUs while waiting for enough to qualify.
const MAX_POLL: Duration = Duration::from_millis(500);

/// The directory holding the lease table: `$GPUPROC_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/gpuproc`, else `/tmp/gpuproc-<uid>`.
pub fn runtime_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(RUNTIME_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("gpuproc");
    }
    PathBuf::from(format!("/tmp/gpuproc-{}", sys::flock::getuid()))
}

/// A process holding a lease: its PID and its start time in clock ticks since boot, which
/// together name one process even when PIDs are reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Start time, clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

impl Holder {
    /// The running process `pid`, or `None` when there is none (or it is a zombie).
    pub fn of(pid: u32) -> Option<Holder> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let stat = parse_stat(&text)?;
        (!matches!(stat.state, 'Z' | 'X')).then_some(Holder {
            pid,
            start_ticks: stat.start_ticks,
        })
    }

    /// Whether this process is still running. When `/proc` cannot say (other than "no such
    /// process"), it is presumed alive, so a lease is never dropped by mistake.
    pub fn is_alive(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(_) => true,
            Ok(text) => parse_stat(&text).is_none_or(|stat| {
                stat.start_ticks == self.start_ticks && !matches!(stat.state, 'Z' | 'X')
            }),
        }
    }
}

/// One lease as the table records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Unique id of the lease.
    pub id: String,
    /// `/proc/sys/kernel/random/boot_id` when the lease was taken (empty if unknown).
    pub boot_id: String,
    /// When the lease was taken, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// How many leases the holder allowed on each of its GPUs.
    pub max_per_gpu: u32,
    /// The processes holding it; it lives while any of them runs.
    pub holders: Vec<Holder>,
    /// The GPUs it holds (names are not recorded).
    pub devices: Vec<PickedDevice>,
}

impl LeaseRecord {
    fn holds(&self, uuid: &str) -> bool {
        self.devices.iter().any(|d| d.uuid == uuid)
    }
}

/// The leases in force, and the round-robin cursor; what [`select`] weighs against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseTable {
    leases: Vec<LeaseRecord>,
    cursor: Option<u32>,
}

impl LeaseTable {
    /// Every lease.
    pub fn leases(&self) -> &[LeaseRecord] {
        &self.leases
    }

    /// Adds a lease.
    pub fn insert(&mut self, record: LeaseRecord) {
        self.leases.push(record);
    }

    /// Removes the lease with this id.
    pub fn remove(&mut self, id: &str) -> Option<LeaseRecord> {
        let pos = self.leases.iter().position(|r| r.id == id)?;
        Some(self.leases.remove(pos))
    }

    /// How many leases hold the GPU with this UUID.
    pub fn count_on(&self, uuid: &str) -> usize {
        self.leases.iter().filter(|r| r.holds(uuid)).count()
    }

    /// The PIDs holding leases on the GPU with this UUID.
    pub fn holders_on(&self, uuid: &str) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .leases
            .iter()
            .filter(|r| r.holds(uuid))
            .flat_map(|r| r.holders.iter().map(|h| h.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The smallest share limit among the leases on this GPU, if it has any.
    pub fn limit_on(&self, uuid: &str) -> Option<u32> {
        self.leases
            .iter()
            .filter(|r| r.holds(uuid))
            .map(|r| r.max_per_gpu)
            .min()
    }

    /// The NVML index most recently handed out, for [`Order::RoundRobin`](super::Order).
    pub fn cursor(&self) -> Option<u32> {
        self.cursor
    }

    /// Sets the round-robin cursor.
    pub fn set_cursor(&mut self, index: u32) {
        self.cursor = Some(index);
    }

    /// Drops the leases for which `live` is false; returns how many.
    fn retain_live(&mut self, live: impl Fn(&LeaseRecord) -> bool) -> usize {
        let before = self.leases.len();
        self.leases.retain(|r| live(r));
        before - self.leases.len()
    }

    fn parse(text: &str) -> Result<LeaseTable, String> {
        let mut table = LeaseTable::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            let mut words = line.split_whitespace();
            match words.next() {
                Some("cursor") => {
                    table.cursor = Some(
                        words
                            .next()
                            .and_then(|w| w.parse().ok())
                            .ok_or_else(|| bad("bad cursor"))?,
                    )
                }
                Some("lease") => {
                    let id = words.next().ok_or_else(|| bad("no lease id"))?.to_string();
                    let mut record = LeaseRecord {
                        id,
                        boot_id: String::new(),
                        created_ms: 0,
                        max_per_gpu: 1,
                        holders: Vec::new(),
                        devices: Vec::new(),
                    };
                    for word in words {
                        let (key, value) = word.split_once('=').ok_or_else(|| bad("no '='"))?;
                        let list = || value.split(',').filter(|v| !v.is_empty());
                        match key {
                            "boot" => record.boot_id = value.to_string(),
                            "created" => {
                                record.created_ms = value.parse().map_err(|_| bad("bad time"))?
                            }
                            "share" => {
                                record.max_per_gpu =
                                    value.parse().map_err(|_| bad("bad share limit"))?
                            }
                            "holders" => {
                                for h in list() {
                                    let (pid, ticks) = h
                                        .split_once(':')
                                        .and_then(|(p, t)| Some((p.parse().ok()?, t.parse().ok()?)))
                                        .ok_or_else(|| bad("bad holder"))?;
                                    record.holders.push(Holder {
                                        pid,
                                        start_ticks: ticks,
                                    });
                                }
                            }
                            "gpus" => {
                                for g in list() {
                                    let (index, uuid) = g
                                        .split_once(':')
                                        .and_then(|(i, u)| Some((i.parse().ok()?, u)))
                                        .ok_or_else(|| bad("bad GPU"))?;
                                    record.devices.push(PickedDevice {
                                        index,
                                        uuid: uuid.to_string(),
                                        name: None,
                                    });
                                }
                            }
                            // Fields from a newer gpuproc are kept out of the way, not fatal.
                            _ => {}
                        }
                    }
                    table.leases.push(record);
                }
                _ => return Err(bad("unknown entry")),
            }
        }
        Ok(table)
    }

    fn to_text(&self) -> String {
        let mut out = format!("{HEADER}\n");
        if let Some(c) = self.cursor {
            out.push_str(&format!("cursor {c}\n"));
        }
        for r in &self.leases {
            let holders: Vec<String> = r
                .holders
                .iter()
                .map(|h| format!("{}:{}", h.pid, h.start_ticks))
                .collect();
            let gpus: Vec<String> = r
                .devices
                .iter()
                .map(|d| format!("{}:{}", d.index, d.uuid))
                .collect();
            out.push_str(&format!(
                "lease {} boot={} created={} share={} holders={} gpus={}\n",
                r.id,
                r.boot_id,
                r.created_ms,
                r.max_per_gpu,
                holders.join(","),
                gpus.join(",")
            ));
        }
        out
    }
}

fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

fn is_live(record: &LeaseRecord) -> bool {
    let boot = boot_id();
    let same_boot = record.boot_id.is_empty() || boot.is_empty() || record.boot_id == boot;
    same_boot && record.holders.iter().any(Holder::is_alive)
}

/// The runtime directory, created when missing.
#[derive(Debug, Clone)]
struct Store {
    dir: PathBuf,
}

/// The table's lock, held until dropped.
#[derive(Debug)]
struct Locked<'a> {
    store: &'a Store,
    _lock: File,
}

impl Store {
    fn open() -> Result<Store, PickError> {
        let dir = runtime_dir();
        let explicit = std::env::var_os(RUNTIME_DIR_ENV).is_some_and(|v| !v.is_empty());
        if explicit {
            fs::create_dir_all(&dir)
                .map_err(PickError::lease("creating the runtime directory", &dir))?;
        } else {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(PickError::lease("creating the runtime directory", &dir)(e)),
            }
            // A shared /tmp: refuse a directory (or link) planted by someone else.
            let meta = fs::symlink_metadata(&dir)
                .map_err(PickError::lease("inspecting the runtime directory", &dir))?;
            if !meta.is_dir() || meta.uid() != sys::flock::getuid() {
                return Err(PickError::lease("checking the runtime directory", &dir)(
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "it is not a directory owned by this user; set {RUNTIME_DIR_ENV} \
                             to another directory"
                        ),
                    ),
                ));
            }
        }
        Ok(Store { dir })
    }

    fn table_path(&self) -> PathBuf {
        self.dir.join(TABLE)
    }

    fn lock(&self) -> Result<Locked<'_>, PickError> {
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(&path)
            .map_err(PickError::lease("opening the lock file", &path))?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            if sys::flock::try_lock_exclusive(&file).map_err(PickError::lease("locking", &path))? {
                return Ok(Locked {
                    store: self,
                    _lock: file,
                });
            }
            if started.elapsed() >= LOCK_TIMEOUT {
                return Err(PickError::lease("locking", &path)(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has held the lock for {}s (a stopped picker?)",
                        LOCK_TIMEOUT.as_secs()
                    ),
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// The table as last written, without taking the lock (writes are atomic renames).
    fn read(&self) -> Result<LeaseTable, PickError> {
        let path = self.table_path();
        match fs::read_to_string(&path) {
            Ok(text) => LeaseTable::parse(&text).map_err(|reason| {
                PickError::lease("reading", &path)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{reason} (remove the file to start afresh)"),
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LeaseTable::default()),
            Err(e) => Err(PickError::lease("reading", &path)(e)),
        }
    }
}

impl Locked<'_> {
    /// The live leases (stale ones are dropped from the copy returned).
    fn read(&self) -> Result<LeaseTable, PickError> {
        let mut table = self.store.read()?;
        table.retain_live(is_live);
        Ok(table)
    }

    fn write(&self, table: &LeaseTable) -> Result<(), PickError> {
        let path = self.store.table_path();
        let aside = self.store.dir.join(format!("{TABLE}.new"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&aside)
            .map_err(PickError::lease("writing", &aside))?;
        file.write_all(table.to_text().as_bytes())
            .map_err(PickError::lease("writing", &aside))?;
        drop(file);
        fs::rename(&aside, &path).map_err(PickError::lease("replacing", &path))
    }
}

/// The leases in force now (stale ones left out), from this user's runtime directory.
///
/// # Errors
/// When the runtime directory or the table cannot be read.
pub fn leases() -> Result<LeaseTable, PickError> {
    let mut table = Store::open()?.read()?;
    table.retain_live(is_live);
    Ok(table)
}

fn new_lease_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
        sys::getpid(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// GPUs picked for this process: recorded in the lease table until released.
///
/// The lease is held by the process that picked (and by any process added with
/// [`share_with`](Self::share_with)); it lasts until [`release`](Self::release), until the
/// handle is dropped, or until all its holders have exited, whichever comes first. A child
/// started with the lease's [`env`](Self::env) runs on the GPUs while the picker holds the
/// lease: that is how [`Process::with_gpus`](crate::Process::with_gpus) uses it.
///
/// ```no_run
/// use gpuproc::gpu::{self, Criteria};
///
/// let lease = gpu::pick(&Criteria::new().count(2).min_free(10 << 30))?;
/// let status = std::process::Command::new("python")
///     .arg("train.py")
///     .envs(lease.env())
///     .status();
/// lease.release()?;
/// # Ok::<(), gpuproc::gpu::PickError>(())
/// ```
///
/// # Dropping
/// Dropping the handle releases the lease, ignoring errors (use [`release`](Self::release)
/// to see them). A copy of the handle in a forked child does nothing when dropped.
#[derive(Debug)]
#[must_use = "the GPUs are released when the lease is dropped"]
pub struct GpuLease {
    id: String,
    devices: Vec<PickedDevice>,
    store: Store,
    owner: u32,
    done: bool,
}

impl GpuLease {
    /// The lease's id in the table.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The GPUs, in the order `CUDA_VISIBLE_DEVICES` lists them (cuda:0 first).
    pub fn devices(&self) -> &[PickedDevice] {
        &self.devices
    }

    /// Their UUIDs.
    pub fn uuids(&self) -> Vec<&str> {
        self.devices.iter().map(|d| d.uuid.as_str()).collect()
    }

    /// Their NVML indices.
    pub fn indices(&self) -> Vec<u32> {
        self.devices.iter().map(|d| d.index).collect()
    }

    /// The `CUDA_VISIBLE_DEVICES` value naming them: full UUIDs, comma-separated, so that
    /// CUDA's device order cannot change which GPUs they are.
    pub fn cuda_visible_devices(&self) -> String {
        cuda_visible_devices(&self.devices)
    }

    /// The environment a process needs to use these GPUs: `CUDA_VISIBLE_DEVICES` and
    /// `NVIDIA_VISIBLE_DEVICES` (for containers started with the NVIDIA runtime).
    pub fn env(&self) -> Vec<(String, String)> {
        device_env(&self.devices)
    }

    /// Adds process `pid` as a holder: the lease then lasts while this process *or* `pid`
    /// runs. `gpuproc pick --hold` adds the command it runs, so the command keeps its GPUs
    /// even if `gpuproc` itself is killed.
    ///
    /// # Errors
    /// [`PickError::Invalid`] when there is no process `pid`; [`PickError::Lease`] when the
    /// table cannot be updated.
    pub fn share_with(&mut self, pid: u32) -> Result<(), PickError> {
        let holder = Holder::of(pid)
            .ok_or_else(|| PickError::invalid(format!("no running process {pid}")))?;
        self.update(|record| {
            if !record.holders.contains(&holder) {
                record.holders.push(holder);
            }
        })
    }

    /// Hands the lease to process `pid`: it becomes the only holder, the lease lasts until
    /// it exits, and this handle is consumed without releasing. `gpuproc pick` without
    /// `--hold` hands its lease to its parent (the shell or script that ran it).
    ///
    /// # Errors
    /// As [`share_with`](Self::share_with); the lease stays with this handle on error.
    pub fn transfer_to(mut self, pid: u32) -> Result<(), PickError> {
        let holder = Holder::of(pid)
            .ok_or_else(|| PickError::invalid(format!("no running process {pid}")))?;
        self.update(|record| record.holders = vec![holder])?;
        self.done = true;
        Ok(())
    }

    /// Releases the GPUs now.
    ///
    /// # Errors
    /// [`PickError::Lease`] when the table cannot be updated; the lease then still ends when
    /// this process exits.
    pub fn release(mut self) -> Result<(), PickError> {
        self.done = true;
        self.remove()
    }

    fn remove(&self) -> Result<(), PickError> {
        let locked = self.store.lock()?;
        let mut table = locked.read()?;
        table.remove(&self.id);
        locked.write(&table)
    }

    fn update(&mut self, change: impl FnOnce(&mut LeaseRecord)) -> Result<(), PickError> {
        let locked = self.store.lock()?;
        let mut table = locked.read()?;
        let Some(record) = table.leases.iter_mut().find(|r| r.id == self.id) else {
            return Err(PickError::invalid(format!(
                "lease {} is no longer in the table {}",
                self.id,
                self.store.table_path().display()
            )));
        };
        change(record);
        locked.write(&table)
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        if !self.done && self.owner == sys::getpid() {
            let _ = self.remove();
        }
    }
}

fn cuda_visible_devices(devices: &[PickedDevice]) -> String {
    devices
        .iter()
        .map(|d| d.uuid.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn device_env(devices: &[PickedDevice]) -> Vec<(String, String)> {
    let value = cuda_visible_devices(devices);
    vec![
        ("CUDA_VISIBLE_DEVICES".to_string(), value.clone()),
        ("NVIDIA_VISIBLE_DEVICES".to_string(), value),
    ]
}

/// Picks GPUs that meet `criteria` and leases them to this process.
///
/// Reads the GPUs through NVML, then, holding the lease table's lock, chooses with
/// [`select`] among the devices this process may use (its own `CUDA_VISIBLE_DEVICES`,
/// unless [`Criteria::within_visible`] says otherwise), not counting its own processes as
/// foreign, and records the lease. With [`Criteria::wait`] it looks again, with growing
/// pauses up to half a second, until enough GPUs qualify or the time is up.
///
/// ```no_run
/// use gpuproc::gpu::{self, Criteria};
///
/// match gpu::pick(&Criteria::new().min_free(20 << 30)) {
///     Ok(lease) => println!("CUDA_VISIBLE_DEVICES={}", lease.cuda_visible_devices()),
///     Err(e) if e.is_none_free() => eprintln!("{e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), gpuproc::gpu::PickError>(())
/// ```
///
/// # Errors
/// [`PickError::is_none_free`] when too few GPUs qualify (in time), with every device's
/// reason; [`PickError::is_no_driver`] without an NVIDIA driver; [`PickError::is_invalid`]
/// for an impossible request; [`PickError::is_lease`] when the runtime directory is unusable.
pub fn pick(criteria: &Criteria) -> Result<GpuLease, PickError> {
    let gpus = super::global()?;
    pick_with(gpus, &Store::open()?, criteria)
}

fn pick_with(gpus: &Gpus, store: &Store, criteria: &Criteria) -> Result<GpuLease, PickError> {
    let started = Instant::now();
    // `None`: no waiting; `Some(None)`: a wait too long for the clock, i.e. for ever.
    let deadline = criteria.wait_timeout().map(|w| started.checked_add(w));
    let visible_env = criteria
        .is_within_visible()
        .then(|| std::env::var("CUDA_VISIBLE_DEVICES").ok())
        .flatten();
    let order = CudaDeviceOrder::parse(std::env::var("CUDA_DEVICE_ORDER").ok().as_deref());
    let me = sys::getpid();
    let mut pause = Duration::from_millis(20);
    loop {
        let mut devices = gpus.devices(criteria.refuses_foreign_processes())?;
        if criteria.refuses_foreign_processes() {
            let ours = Proc::new(PathBuf::from("/proc")).with_descendants(me);
            for d in &mut devices {
                if let Some(list) = &mut d.processes {
                    list.retain(|p| !p.pid.is_some_and(|pid| ours.contains(&pid)));
                }
            }
        }
        let visible: Option<Vec<u32>> = visible_env.as_deref().map(|env| {
            let selectors = parse_cuda_visible_devices(env);
            resolve_visible_devices(Some(&selectors), order, &devices)
                .into_iter()
                .filter(|r| r.mig.is_none())
                .map(|r| devices[r.device].index)
                .collect()
        });
        let locked = store.lock()?;
        let mut table = locked.read()?;
        match select(&devices, &table, visible.as_deref(), criteria) {
            Ok(chosen) => {
                let holder = Holder::of(me).ok_or_else(|| {
                    PickError::lease("reading", format!("/proc/{me}/stat"))(io::Error::new(
                        io::ErrorKind::NotFound,
                        "this process's start time is unreadable",
                    ))
                })?;
                let id = new_lease_id();
                if let Some(last) = chosen.last() {
                    table.set_cursor(last.index);
                }
                table.insert(LeaseRecord {
                    id: id.clone(),
                    boot_id: boot_id().to_string(),
                    created_ms: now_ms(),
                    max_per_gpu: criteria.share_limit(),
                    holders: vec![holder],
                    devices: chosen.clone(),
                });
                locked.write(&table)?;
                return Ok(GpuLease {
                    id,
                    devices: chosen,
                    store: store.clone(),
                    owner: me,
                    done: false,
                });
            }
            Err(PickError::NoneFree(mut why)) => {
                drop(locked);
                let now = Instant::now();
                let left = deadline.map(|d| d.map_or(pause, |d| d.saturating_duration_since(now)));
                match left {
                    Some(left) if !left.is_zero() && !why.is_impossible() => {
                        std::thread::sleep(pause.min(left));
                        pause = (pause * 2).min(MAX_POLL);
                    }
                    _ => {
                        if deadline.is_some() {
                            why.waited = Some(started.elapsed());
                        }
                        return Err(PickError::NoneFree(why));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a pool's workers share GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Share {
    /// Each worker gets this many GPUs of its own.
    GpusPerWorker(usize),
    /// This many workers share each GPU.
    WorkersPerGpu(usize),
}

impl Share {
    /// How many GPUs `workers` workers need.
    pub fn gpus_needed(self, workers: usize) -> usize {
        match self {
            Share::GpusPerWorker(n) => workers * n,
            Share::WorkersPerGpu(k) => workers.div_ceil(k.max(1)),
        }
    }
}

/// Splits picked GPUs among `workers` workers: with [`Share::GpusPerWorker`]`(n)`, worker
/// `i` gets GPUs `i*n .. (i+1)*n`; with [`Share::WorkersPerGpu`]`(k)`, worker `i` gets GPU
/// `i % g` (`g` = the number of GPUs), so no GPU has more than `k` workers.
///
/// ```
/// use gpuproc::gpu::{worker_slots, PickedDevice, Share};
/// let gpus: Vec<PickedDevice> = (0..2)
///     .map(|i| PickedDevice { index: i, uuid: format!("GPU-{i}"), name: None })
///     .collect();
/// let slots = worker_slots(&gpus, 3, Share::WorkersPerGpu(2));
/// let indices: Vec<Vec<u32>> =
///     slots.iter().map(|s| s.iter().map(|d| d.index).collect()).collect();
/// assert_eq!(indices, vec![vec![0], vec![1], vec![0]]);
/// ```
pub fn worker_slots(
    devices: &[PickedDevice],
    workers: usize,
    share: Share,
) -> Vec<Vec<PickedDevice>> {
    (0..workers)
        .map(|i| match share {
            Share::GpusPerWorker(n) => devices
                .get(i * n..(i + 1) * n)
                .map(<[PickedDevice]>::to_vec)
                .unwrap_or_default(),
            Share::WorkersPerGpu(_) if devices.is_empty() => Vec::new(),
            Share::WorkersPerGpu(_) => vec![devices[i % devices.len()].clone()],
        })
        .collect()
}

/// GPUs leased for a pool's workers: one lease for the pool, split into one slot per worker.
#[derive(Debug)]
#[must_use = "the GPUs are released when this is dropped"]
pub struct WorkerGpus {
    lease: GpuLease,
    slots: Vec<Vec<PickedDevice>>,
}

impl WorkerGpus {
    /// The GPUs of each worker, worker 0 first.
    pub fn slots(&self) -> &[Vec<PickedDevice>] {
        &self.slots
    }

    /// The environment for worker `worker` (`CUDA_VISIBLE_DEVICES` and
    /// `NVIDIA_VISIBLE_DEVICES`); a replacement for a dead worker gets the same.
    ///
    /// # Panics
    /// When `worker` is not below the number of workers asked for.
    pub fn env(&self, worker: usize) -> Vec<(String, String)> {
        device_env(&self.slots[worker])
    }

    /// The lease behind the slots.
    pub fn lease(&self) -> &GpuLease {
        &self.lease
    }

    /// Releases the GPUs now.
    ///
    /// # Errors
    /// As [`GpuLease::release`].
    pub fn release(self) -> Result<(), PickError> {
        self.lease.release()
    }
}

/// Picks and leases GPUs for `workers` workers sharing them as `share` says, as one lease
/// held by this process (the pool's owner): `criteria`'s count is replaced by the number
/// needed, and its share limit counts the pool once, however many workers share a GPU.
///
/// # Errors
/// As [`pick`]; [`PickError::Invalid`] for zero workers or a zero share.
pub fn pick_for_workers(
    workers: usize,
    share: Share,
    criteria: &Criteria,
) -> Result<WorkerGpus, PickError> {
    if workers == 0 || matches!(share, Share::GpusPerWorker(0) | Share::WorkersPerGpu(0)) {
        return Err(PickError::invalid(format!(
            "{workers} workers with {share:?}: both must be at least 1"
        )));
    }
    let lease = pick(&criteria.with_count(share.gpus_needed(workers)))?;
    let slots = worker_slots(&lease.devices, workers, share);
    Ok(WorkerGpus { lease, slots })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32) -> PickedDevice {
        PickedDevice {
            index,
            uuid: format!("GPU-{index}"),
            name: None,
        }
    }

    fn record(id: &str, holders: Vec<Holder>, gpus: &[u32]) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            boot_id: boot_id().to_string(),
            created_ms: 17,
            max_per_gpu: 2,
            holders,
            devices: gpus.iter().map(|&i| dev(i)).collect(),
        }
    }

    #[test]
    fn table_text_round_trips() {
        let mut t = LeaseTable::default();
        t.set_cursor(3);
        t.insert(record(
            "1-0-5",
            vec![
                Holder {
                    pid: 10,
                    start_ticks: 99,
                },
                Holder {
                    pid: 11,
                    start_ticks: 100,
                },
            ],
            &[0, 3],
        ));
        t.insert(record("2-0-6", vec![], &[]));
        let text = t.to_text();
        assert!(text.starts_with(HEADER));
        assert_eq!(LeaseTable::parse(&text).unwrap(), t);
        assert_eq!(t.count_on("GPU-3"), 1);
        assert_eq!(t.holders_on("GPU-3"), vec![10, 11]);
        assert_eq!(t.limit_on("GPU-3"), Some(2));
        assert_eq!(t.limit_on("GPU-1"), None);
        assert!(t.remove("1-0-5").is_some());
        assert!(t.remove("1-0-5").is_none());
        assert_eq!(t.count_on("GPU-3"), 0);
    }

    #[test]
    fn table_parse_errors_name_the_line() {
        let err = LeaseTable::parse("# c\ncursor x\n").unwrap_err();
        assert!(err.contains("line 2: bad cursor"), "{err}");
        let err = LeaseTable::parse("lease a holders=1\n").unwrap_err();
        assert!(err.contains("bad holder"), "{err}");
        assert!(LeaseTable::parse("bogus\n").is_err());
        // Unknown fields are tolerated.
        let t = LeaseTable::parse("lease a future=1 gpus=0:GPU-0\n").unwrap();
        assert_eq!(t.leases()[0].devices, vec![dev(0)]);
        assert_eq!(t.leases()[0].max_per_gpu, 1);
    }

    #[test]
    fn holders_are_identified_by_pid_and_start_time() {
        let me = Holder::of(sys::getpid()).unwrap();
        assert!(me.is_alive());
        // The same pid with another start time is a different (dead) process.
        let reused = Holder {
            pid: me.pid,
            start_ticks: me.start_ticks + 1,
        };
        assert!(!reused.is_alive());
        assert!(Holder::of(u32::MAX - 1).is_none());
        assert!(!Holder {
            pid: u32::MAX - 1,
            start_ticks: 0
        }
        .is_alive());
        assert!(is_live(&record("a", vec![reused, me], &[0])));
        assert!(!is_live(&record("a", vec![reused], &[0])));
        let mut old = record("a", vec![me], &[0]);
        old.boot_id = "another-boot".into();
        assert!(boot_id().is_empty() || !is_live(&old));
    }

    #[test]
    fn zombies_hold_nothing() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait for the exit without reaping: the child stays a zombie.
        use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
        let raw = Pid::from_raw(pid as i32).unwrap();
        waitid(
            WaitId::Pid(raw),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        )
        .unwrap();
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert_eq!(parse_stat(&text).unwrap().state, 'Z');
        assert!(Holder::of(pid).is_none());
        child.wait().unwrap();
    }

    #[test]
    fn slots_for_workers() {
        let gpus: Vec<PickedDevice> = (0..4).map(dev).collect();
        let idx = |slots: Vec<Vec<PickedDevice>>| -> Vec<Vec<u32>> {
            slots
                .iter()
                .map(|s| s.iter().map(|d| d.index).collect())
                .collect()
        };
        assert_eq!(
            idx(worker_slots(&gpus, 2, Share::GpusPerWorker(2))),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert_eq!(
            idx(worker_slots(&gpus[..2], 5, Share::WorkersPerGpu(3))),
            vec![vec![0], vec![1], vec![0], vec![1], vec![0]]
        );
        assert_eq!(Share::WorkersPerGpu(3).gpus_needed(5), 2);
        assert_eq!(Share::WorkersPerGpu(3).gpus_needed(6), 2);
        assert_eq!(Share::WorkersPerGpu(3).gpus_needed(7), 3);
        assert_eq!(Share::GpusPerWorker(2).gpus_needed(3), 6);
        assert_eq!(
            device_env(&gpus[1..3]),
            vec![
                (
                    "CUDA_VISIBLE_DEVICES".to_string(),
                    "GPU-1,GPU-2".to_string()
                ),
                (
                    "NVIDIA_VISIBLE_DEVICES".to_string(),
                    "GPU-1,GPU-2".to_string()
                ),
            ]
        );
    }
}
