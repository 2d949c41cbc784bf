//! Leases: which GPUs have been handed out, recorded where every picker on the machine sees
//! them, so that two programs never pick the same GPU beyond its allowed share.
//!
//! # The table
//! The runtime directory ([`runtime_dir`]) holds one lease file per user, `leases.<uid>`,
//! owned by that user and readable by all (mode 0644, whatever the umask). A picker takes an
//! exclusive `flock` on `leases.lock` and on the directory itself, reads every user's file,
//! chooses, and rewrites its own file only: written to a new file of a unique name (created
//! with `O_EXCL`), flushed with `fsync`, renamed over the old one, and the directory flushed.
//! Each lease names its GPUs (full UUIDs), its share limit and its holders: processes
//! identified by PID *and* start time (from `/proc/PID/stat`), so a reused PID is not mistaken
//! for the holder. A lease whose holders have all exited (or that was written before the last
//! boot) is stale: every reader ignores it and the next write of its user's file drops it. So
//! a lease vanishes when its holder dies, however it dies.
//!
//! A lease file is parsed strictly: a header with the format number, every field of every
//! lease, an `end N` line counting the leases and the final newline, so a file cut short is
//! an error, never a shorter table. A file that cannot be read or parsed stops every pick
//! (its leases are unknown, so no GPU is handed out on the strength of it) with an error
//! naming the file and the way out: remove it once no job of its user uses the GPUs it lists.
//!
//! # Sharing the directory
//! Leases coordinate the processes that share a runtime directory and a PID namespace: by
//! default those of one user on one machine. To coordinate a team, point
//! `GPUPROC_RUNTIME_DIR` at a directory they can all write to, made sticky so that none can
//! remove another's files: `mkdir -m 1777 DIR`, or a group's directory with `chmod 3770 DIR`.
//! A picker refuses a directory that other users may write to but that is not sticky.
//!
//! What a hostile user sharing the directory can and cannot do:
//! - They cannot forge or drop another user's leases: each user writes only their own file,
//!   which the sticky bit stops others from removing or replacing. A file named for a user
//!   but owned by another, or that is not a regular file, is not read as a lease file (and
//!   its named user's own picks refuse it until it is removed).
//! - They cannot redirect a picker's writes or make it create files elsewhere: no file in
//!   the directory is opened through a symbolic link (`O_NOFOLLOW`), the file written aside
//!   is created exclusively under a fresh name, and the rename replaces a planted link, not
//!   its target. A FIFO or device in place of a file is refused without blocking.
//! - They cannot let two pickers in at once by replacing `leases.lock` (which they may own):
//!   pickers also lock the directory, which only its owner can replace.
//! - They can stall everyone: by holding the lock (each picker gives up after 30 s with an
//!   error saying so), by making `leases.lock` unreadable, or by leaving an unreadable or
//!   unparsable lease file of their own (every pick then fails with an error naming it). They can also lease every GPU
//!   for themselves, as any user can. None of this hands a GPU out twice.
//! - The directory's owner and root can do anything, as with any directory.
//!

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::host::{parse_stat, Proc};
use super::nvml::Gpus;
use super::pick::{select, Criteria, PickError, PickedDevice};
use super::visible::{
    parse_cuda_visible_devices, slurm_gpus_from_env, slurm_visible_devices, CudaDeviceOrder,
};
use crate::sys;

/// The environment variable naming the directory that holds the lease table.
pub const RUNTIME_DIR_ENV: &str = "GPUPROC_RUNTIME_DIR";

/// The lease files are `leases.<uid>`, one per user.
const TABLE: &str = "leases";
const LOCK: &str = "leases.lock";
const HEADER_PREFIX: &str = "# gpuproc GPU leases, format ";
/// The format lease files are written in. Format 1 was one `leases` file for every user.
const FORMAT: u32 = 2;
/// The largest lease file read (a lease takes about 200 bytes).
const MAX_FILE: u64 = 4 << 20;
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

    /// Parses a lease file, strictly: the header with its format number, every line of a
    /// lease with all its fields, the closing `end N` line counting the leases, and the final
    /// newline, so a file cut short at any byte is an error, never a shorter table.
    fn parse(text: &str) -> Result<LeaseTable, String> {
        let Some(body) = text.strip_suffix('\n') else {
            return Err(if text.is_empty() {
                "the file is empty (cut short?)".to_string()
            } else {
                "the file does not end with a newline (cut short?)".to_string()
            });
        };
        let mut lines = body.split('\n').enumerate();
        let bad =
            |n: usize, line: &str, what: &str| format!("line {}: {what}: {}", n + 1, quote(line));
        let (_, header) = lines.next().unwrap_or((0, ""));
        let format = header
            .strip_prefix(HEADER_PREFIX)
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| bad(0, header, "not a gpuproc lease file header"))?;
        if format != FORMAT {
            return Err(format!(
                "line 1: format {format}, while this gpuproc reads format {FORMAT} (written by \
                 another version of gpuproc?)"
            ));
        }
        let mut table = LeaseTable::default();
        let mut ended = false;
        for (n, line) in lines {
            if ended {
                return Err(bad(n, line, "text after the end line"));
            }
            let mut words = line.split(' ');
            match words.next() {
                Some("cursor") if table.cursor.is_none() => {
                    table.cursor = Some(
                        words
                            .next()
                            .and_then(|w| w.parse().ok())
                            .filter(|_| words.next().is_none())
                            .ok_or_else(|| bad(n, line, "bad cursor"))?,
                    )
                }
                Some("lease") => {
                    let record = parse_lease(words).map_err(|what| bad(n, line, what))?;
                    table.leases.push(record);
                }
                Some("end") => {
                    let count: usize = words
                        .next()
                        .and_then(|w| w.parse().ok())
                        .filter(|_| words.next().is_none())
                        .ok_or_else(|| bad(n, line, "bad end line"))?;
                    if count != table.leases.len() {
                        return Err(bad(
                            n,
                            line,
                            &format!("{} leases before it", table.leases.len()),
                        ));
                    }
                    ended = true;
                }
                _ => return Err(bad(n, line, "unknown entry")),
            }
        }
        if !ended {
            return Err("no end line (cut short?)".to_string());
        }
        Ok(table)
    }

    fn to_text(&self) -> String {
        let mut out = format!("{HEADER_PREFIX}{FORMAT}: one lease per line\n");
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
        out.push_str(&format!("end {}\n", self.leases.len()));
        out
    }
}

/// A lease line after its `lease` keyword: the id, then every field (`key=value`; fields
/// from a newer gpuproc are skipped, but each of ours must be there, once).
fn parse_lease<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<LeaseRecord, &'static str> {
    let id = words
        .next()
        .filter(|w| !w.is_empty())
        .ok_or("no lease id")?;
    let (mut boot, mut created, mut share, mut holders, mut gpus) = (None, None, None, None, None);
    for word in words {
        let (key, value) = word.split_once('=').ok_or("no '='")?;
        let slot = match key {
            "boot" => &mut boot,
            "created" => &mut created,
            "share" => &mut share,
            "holders" => &mut holders,
            "gpus" => &mut gpus,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err("a field given twice");
        }
    }
    let list = |v: &'a str| v.split(',').filter(|v| !v.is_empty());
    let holders = list(holders.ok_or("no holders")?)
        .map(|h| {
            let (pid, ticks) = h.split_once(':')?;
            Some(Holder {
                pid: pid.parse().ok()?,
                start_ticks: ticks.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("bad holder")?;
    let devices = list(gpus.ok_or("no GPUs")?)
        .map(|g| {
            let (index, uuid) = g.split_once(':')?;
            Some(PickedDevice {
                index: index.parse().ok()?,
                uuid: uuid.to_string(),
                name: None,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("bad GPU")?;
    Ok(LeaseRecord {
        id: id.to_string(),
        boot_id: boot.ok_or("no boot id")?.to_string(),
        created_ms: created
            .ok_or("no creation time")?
            .parse()
            .map_err(|_| "bad time")?,
        max_per_gpu: share
            .ok_or("no share limit")?
            .parse()
            .map_err(|_| "bad share limit")?,
        holders,
        devices,
    })
}

/// `line` quoted for an error message: at most about 100 bytes of it.
fn quote(line: &str) -> String {
    const MAX: usize = 100;
    if line.len() <= MAX {
        return format!("{line:?}");
    }
    let mut end = MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &line[..end], line.len())
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

/// The table's locks, held until dropped, and the runtime directory they guard.
#[derive(Debug)]
struct Locked<'a> {
    store: &'a Store,
    dir: OwnedFd,
    _lock: File,
}

/// The name of the lease file of user `uid`.
fn user_file(uid: u32) -> String {
    format!("{TABLE}.{uid}")
}

/// The user whose lease file `name` is, if it names one (`leases.<uid>`, digits only).
fn user_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(TABLE)?.strip_prefix('.')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only the name gpuproc writes: `leases.0123` is not a second name for `leases.123`.
    digits
        .parse()
        .ok()
        .filter(|uid: &u32| uid.to_string() == digits)
}

fn refuse(kind: io::ErrorKind, why: impl Into<String>) -> io::Error {
    io::Error::new(kind, why.into())
}

/// Why a file in the runtime directory cannot be trusted, if it cannot.
fn untrusted(info: &sys::flock::FileInfo, owner: Option<u32>) -> Option<String> {
    use sys::flock::Kind;
    match info.kind {
        Kind::Regular => {}
        Kind::Directory => return Some("it is a directory, not a regular file".into()),
        Kind::Symlink => return Some("it is a symbolic link, not a regular file".into()),
        Kind::Other(what) => return Some(format!("it is {what}, not a regular file")),
    }
    match owner {
        Some(uid) if info.uid != uid => Some(format!(
            "it belongs to uid {}, not to uid {uid} as its name says",
            info.uid
        )),
        _ => None,
    }
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

    /// The path of this user's lease file.
    fn table_path(&self) -> PathBuf {
        self.dir.join(user_file(sys::flock::geteuid()))
    }

    fn open_dir(&self) -> Result<OwnedFd, PickError> {
        let dir = sys::flock::open_dir(&self.dir)
            .map_err(PickError::lease("opening the runtime directory", &self.dir))?;
        let info = sys::flock::info(&dir).map_err(PickError::lease(
            "inspecting the runtime directory",
            &self.dir,
        ))?;
        if info.others_may_write() && !info.is_sticky() {
            return Err(PickError::lease(
                "checking the runtime directory",
                &self.dir,
            )(refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "other users may write to it (mode {:04o}) but it is not sticky, so any of \
                     them could remove the others' leases: run `chmod +t {}`",
                    info.mode,
                    self.dir.display()
                ),
            )));
        }
        Ok(dir)
    }

    /// Opens `leases.lock` for reading (`flock` needs no more, so a lock file another user
    /// created 0644 serves everyone), creating it 0644 when missing.
    fn open_lock_file(&self, dir: &OwnedFd) -> Result<File, PickError> {
        let path = self.dir.join(LOCK);
        let err = |context| PickError::lease(context, &path);
        // A racing creator makes the first open fail and the creation fail; twice is enough.
        let mut attempts = 0;
        let file = loop {
            match sys::flock::open_read_at(dir.as_fd(), LOCK) {
                Ok((file, info)) => {
                    if let Some(why) = untrusted(&info, None) {
                        return Err(err("opening the lock file")(refuse(
                            io::ErrorKind::InvalidData,
                            why,
                        )));
                    }
                    break file;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => {
                    attempts += 1;
                    match sys::flock::create_new_at(dir.as_fd(), LOCK, 0o644, false) {
                        Ok(file) => break file,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(err("creating the lock file")(e)),
                    }
                }
                Err(e) => return Err(err("opening the lock file")(e)),
            }
        };
        Ok(file)
    }

    /// Takes the table's locks: `flock` on `leases.lock`, then on the runtime directory
    /// itself, which no user but its owner can remove or replace, so a user who replaces
    /// `leases.lock` (their own file) cannot let two pickers in at once.
    fn lock(&self) -> Result<Locked<'_>, PickError> {
        self.lock_within(LOCK_TIMEOUT)
    }

    /// [`lock`](Self::lock), giving up after `timeout`.
    fn lock_within(&self, timeout: Duration) -> Result<Locked<'_>, PickError> {
        let dir = self.open_dir()?;
        let lock = self.open_lock_file(&dir)?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        let path = self.dir.join(LOCK);
        let mut have_file = false;
        loop {
            if !have_file {
                have_file = sys::flock::try_lock_exclusive(&lock)
                    .map_err(PickError::lease("locking", &path))?;
            }
            if have_file
                && sys::flock::try_lock_exclusive(&dir)
                    .map_err(PickError::lease("locking", &self.dir))?
            {
                return Ok(Locked {
                    store: self,
                    dir,
                    _lock: lock,
                });
            }
            if started.elapsed() >= timeout {
                return Err(PickError::lease("locking", &path)(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has held the lock for {}s (a stopped picker?)",
                        timeout.as_secs()
                    ),
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Reads the lease file `name` of user `uid`: `Ok(None)` when there is none, or when it
    /// is not a regular file of that user (not a lease file: it says nothing). `strict`:
    /// such a file is an error instead (this user's own file).
    fn read_file(
        &self,
        dir: &OwnedFd,
        uid: u32,
        strict: bool,
    ) -> Result<Option<LeaseTable>, PickError> {
        let name = user_file(uid);
        let path = self.dir.join(&name);
        let recover = || {
            format!(
                "remove {} after checking that no job of uid {uid} uses the GPUs it lists",
                path.display()
            )
        };
        let (file, info) = match sys::flock::open_read_at(dir.as_fd(), &name) {
            Ok(opened) => opened,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if !strict && e.kind() == io::ErrorKind::InvalidInput => return Ok(None),
            Err(e) => return Err(PickError::lease("reading", &path)(e)),
        };
        if let Some(why) = untrusted(&info, Some(uid)) {
            if !strict {
                return Ok(None);
            }
            return Err(PickError::lease("reading", &path)(refuse(
                io::ErrorKind::InvalidData,
                format!("{why}; remove it (as its owner, or root)"),
            )));
        }
        let mut text = String::new();
        let read = io::Read::take(&file, MAX_FILE + 1).read_to_string(&mut text);
        let result = match read {
            Ok(n) if n as u64 > MAX_FILE => Err(format!("larger than {MAX_FILE} bytes")),
            Ok(_) => LeaseTable::parse(&text),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err("not UTF-8 text".into()),
            Err(e) => return Err(PickError::lease("reading", &path)(e)),
        };
        result.map(Some).map_err(|reason| {
            // Never hand out a GPU on the strength of a table that cannot be read: its
            // leases are unknown.
            PickError::lease("reading", &path)(refuse(
                io::ErrorKind::InvalidData,
                format!(
                    "{reason}; its leases are unknown, so no GPU is handed out: {}",
                    recover()
                ),
            ))
        })
    }

    /// The leases of every user but `me` (whose file the caller reads itself).
    fn read_others(&self, dir: &OwnedFd, me: u32) -> Result<Vec<LeaseRecord>, PickError> {
        let names =
            sys::flock::list_dir(dir.as_fd()).map_err(PickError::lease("listing", &self.dir))?;
        let mut all = Vec::new();
        for uid in names.iter().filter_map(|n| user_of(n)) {
            if uid != me {
                if let Some(table) = self.read_file(dir, uid, false)? {
                    all.extend(table.leases);
                }
            }
        }
        Ok(all)
    }

    /// Every user's leases, without taking the lock (each file is replaced atomically).
    fn read(&self) -> Result<LeaseTable, PickError> {
        let dir = match sys::flock::open_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LeaseTable::default()),
            Err(e) => return Err(PickError::lease("opening the runtime directory", &self.dir)(e)),
        };
        let me = sys::flock::geteuid();
        let mut table = self.read_file(&dir, me, true)?.unwrap_or_default();
        table.leases.extend(self.read_others(&dir, me)?);
        Ok(table)
    }
}

impl Locked<'_> {
    /// This user's live leases and cursor (stale leases are dropped from the copy).
    fn read_own(&self) -> Result<LeaseTable, PickError> {
        let mut table = self
            .store
            .read_file(&self.dir, sys::flock::geteuid(), true)?
            .unwrap_or_default();
        table.retain_live(is_live);
        Ok(table)
    }

    /// `own` with every other user's live leases added: what a pick weighs against.
    fn with_others(&self, own: &LeaseTable) -> Result<LeaseTable, PickError> {
        let mut all = own.clone();
        let others = self.store.read_others(&self.dir, sys::flock::geteuid())?;
        all.leases.extend(others.into_iter().filter(is_live));
        Ok(all)
    }

    /// Replaces this user's lease file with `table`: written to a new file of a unique name
    /// (created exclusively, never through a link), flushed, renamed over the old one, and
    /// the directory flushed.
    fn write(&self, table: &LeaseTable) -> Result<(), PickError> {
        let me = sys::flock::geteuid();
        let name = user_file(me);
        let path = self.store.dir.join(&name);
        let dir = self.dir.as_fd();
        // Files left aside by a writer that died: every writer holds the lock.
        let prefix = format!("{name}.new.");
        if let Ok(names) = sys::flock::list_dir(dir) {
            for old in names.iter().filter(|n| n.starts_with(&prefix)) {
                if sys::flock::info_at(dir, old).is_ok_and(|i| i.uid == me) {
                    let _ = sys::flock::unlink_at(dir, old);
                }
            }
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut attempts = 0;
        let (aside, mut file) = loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let aside = format!(
                "{prefix}{}.{nanos}{}",
                sys::getpid(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            match sys::flock::create_new_at(dir, &aside, 0o644, true) {
                Ok(file) => break (aside, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => {
                    attempts += 1;
                }
                Err(e) => return Err(PickError::lease("writing", self.store.dir.join(aside))(e)),
            }
        };
        let aside_path = self.store.dir.join(&aside);
        let written = file
            .write_all(table.to_text().as_bytes())
            .and_then(|()| sys::flock::sync(&file))
            .map_err(PickError::lease("writing", &aside_path))
            .and_then(|()| {
                sys::flock::rename_at(dir, &aside, &name)
                    .map_err(PickError::lease("replacing", &path))
            });
        if written.is_err() {
            let _ = sys::flock::unlink_at(dir, &aside);
        }
        written?;
        sys::flock::sync(dir).map_err(PickError::lease("flushing", &self.store.dir))
    }
}

/// The leases in force now (stale ones left out), from every user's file in the runtime
/// directory.
///
/// # Errors
/// When the runtime directory or a lease file cannot be read.
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
        let mut table = locked.read_own()?;
        table.remove(&self.id);
        locked.write(&table)
    }

    fn update(&mut self, change: impl FnOnce(&mut LeaseRecord)) -> Result<(), PickError> {
        let locked = self.store.lock()?;
        let mut table = locked.read_own()?;
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
    let deadline = criteria.wait_timeout().map(crate::time::deadline);
    let visible_env = criteria
        .is_within_visible()
        .then(|| std::env::var("CUDA_VISIBLE_DEVICES").ok())
        .flatten();
    let order = CudaDeviceOrder::parse(std::env::var("CUDA_DEVICE_ORDER").ok().as_deref());
    let slurm = slurm_gpus_from_env();
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
            slurm_visible_devices(Some(&selectors), slurm.as_deref(), order, &devices)
                .into_iter()
                .filter(|r| r.mig.is_none())
                .map(|r| devices[r.device].index)
                .collect()
        });
        let locked = store.lock()?;
        let mut table = locked.read_own()?;
        let everyone = locked.with_others(&table)?;
        match select(&devices, &everyone, visible.as_deref(), criteria) {
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
        assert!(text.starts_with(HEADER_PREFIX));
        assert!(text.ends_with("end 2\n"), "{text}");
        assert_eq!(LeaseTable::parse(&text).unwrap(), t);
        assert_eq!(t.count_on("GPU-3"), 1);
        assert_eq!(t.holders_on("GPU-3"), vec![10, 11]);
        assert_eq!(t.limit_on("GPU-3"), Some(2));
        assert_eq!(t.limit_on("GPU-1"), None);
        assert!(t.remove("1-0-5").is_some());
        assert!(t.remove("1-0-5").is_none());
        assert_eq!(t.count_on("GPU-3"), 0);
    }

    /// A lease file: the header, then `body`, then its end line.
    fn file(body: &str, leases: usize) -> String {
        format!("{HEADER_PREFIX}{FORMAT}: one lease per line\n{body}end {leases}\n")
    }

    #[test]
    fn table_parse_errors_name_the_line() {
        let err = LeaseTable::parse(&file("cursor x\n", 0)).unwrap_err();
        assert!(err.contains("line 2: bad cursor"), "{err}");
        let all = "boot= created=1 share=1 gpus=0:GPU-0";
        let err = LeaseTable::parse(&file(&format!("lease a {all} holders=1\n"), 1)).unwrap_err();
        assert!(err.contains("bad holder"), "{err}");
        assert!(LeaseTable::parse(&file("bogus\n", 0)).is_err());
        // Unknown fields are tolerated.
        let text = file(&format!("lease a future=1 {all} holders=\n"), 1);
        let t = LeaseTable::parse(&text).unwrap();
        assert_eq!(t.leases()[0].devices, vec![dev(0)]);
        assert_eq!(t.leases()[0].max_per_gpu, 1);
        // Every field is required, once.
        for missing in ["boot=", "created=1", "share=1", "gpus=0:GPU-0"] {
            let line = format!("lease a {all} holders=\n").replace(&format!("{missing} "), "");
            let err = LeaseTable::parse(&file(&line, 1)).unwrap_err();
            assert!(err.contains("line 2: no "), "{missing}: {err}");
        }
        let err =
            LeaseTable::parse(&file(&format!("lease a {all} holders= share=2\n"), 1)).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        // The header names the format; the end line counts the leases.
        let err = LeaseTable::parse("# gpuproc GPU leases, format 1: one lease per line\nend 0\n")
            .unwrap_err();
        assert!(err.contains("format 1"), "{err}");
        let err = LeaseTable::parse(&file("", 1)).unwrap_err();
        assert!(err.contains("0 leases before it"), "{err}");
        let err = LeaseTable::parse(&(file("", 0) + "cursor 1\n")).unwrap_err();
        assert!(err.contains("after the end line"), "{err}");
    }

    #[test]
    fn a_table_cut_short_anywhere_is_an_error() {
        let me = Holder {
            pid: 10,
            start_ticks: 99,
        };
        let mut t = LeaseTable::default();
        t.set_cursor(1);
        t.insert(record("1-0-5", vec![me], &[0, 3]));
        t.insert(record("2-0-6", vec![me], &[1]));
        let text = t.to_text();
        assert_eq!(LeaseTable::parse(&text).unwrap(), t);
        for cut in 0..text.len() {
            assert!(
                LeaseTable::parse(&text[..cut]).is_err(),
                "cut at byte {cut} of {} accepted: {:?}",
                text.len(),
                &text[..cut]
            );
        }
    }

    #[test]
    fn bad_lines_are_quoted_briefly() {
        let long = format!("lease {}\n", "é".repeat(5000));
        let err = LeaseTable::parse(&file(&long, 1)).unwrap_err();
        assert!(err.len() < 200, "{} bytes: {err}", err.len());
        assert!(err.contains("(10006 bytes)"), "{err}");
        assert_eq!(quote("short"), "\"short\"");
    }

    #[test]
    fn lease_file_names() {
        assert_eq!(user_file(1000), "leases.1000");
        assert_eq!(user_of("leases.1000"), Some(1000));
        for name in [
            "leases",
            "leases.",
            "leases.lock",
            "leases.1000.new.1.2",
            "leases.+1",
        ] {
            assert_eq!(user_of(name), None, "{name}");
        }
        assert_eq!(user_of("leases.99999999999"), None);
        assert_eq!(user_of("leases.0"), Some(0));
        assert_eq!(user_of("leases.01000"), None);
    }

    fn scratch(name: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("gpuproc-lease-{}-{name}", sys::getpid()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Store { dir }
    }

    #[test]
    fn replacing_the_lock_file_does_not_let_a_second_picker_in() {
        let store = scratch("relock");
        let held = store.lock().unwrap();
        // Whoever owns `leases.lock` may replace it; the directory stays locked.
        fs::rename(store.dir.join(LOCK), store.dir.join("old.lock")).unwrap();
        let err = store.lock_within(Duration::ZERO).unwrap_err();
        assert!(format!("{err:?}").contains("held the lock"), "{err:?}");
        drop(held);
        drop(store.lock_within(Duration::ZERO).unwrap());
        let _ = fs::remove_dir_all(&store.dir);
    }

    #[test]
    fn a_writable_runtime_directory_must_be_sticky() {
        use std::os::unix::fs::PermissionsExt;
        let store = scratch("sticky");
        fs::set_permissions(&store.dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = store.lock().unwrap_err();
        assert!(format!("{err:?}").contains("chmod +t"), "{err:?}");
        fs::set_permissions(&store.dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let locked = store.lock().unwrap();
        let mut table = locked.read_own().unwrap();
        table.set_cursor(2);
        locked.write(&table).unwrap();
        assert_eq!(locked.read_own().unwrap().cursor(), Some(2));
        // Only the lock file and this user's lease file: nothing left aside.
        let mut names = sys::flock::list_dir(locked.dir.as_fd()).unwrap();
        names.sort();
        let mut expected = vec![LOCK.to_string(), user_file(sys::flock::geteuid())];
        expected.sort();
        assert_eq!(names, expected);
        drop(locked);
        let _ = fs::remove_dir_all(&store.dir);
    }

    #[test]
    fn only_regular_files_of_the_named_user_are_trusted() {
        use sys::flock::{FileInfo, Kind};
        let file = |kind, uid| FileInfo {
            kind,
            uid,
            mode: 0o644,
        };
        assert_eq!(untrusted(&file(Kind::Regular, 7), Some(7)), None);
        assert_eq!(untrusted(&file(Kind::Regular, 8), None), None);
        let why = untrusted(&file(Kind::Regular, 8), Some(7)).unwrap();
        assert!(why.contains("belongs to uid 8, not to uid 7"), "{why}");
        assert!(untrusted(&file(Kind::Symlink, 7), Some(7)).is_some());
        assert!(untrusted(&file(Kind::Directory, 7), None).is_some());
        let why = untrusted(&file(Kind::Other("a FIFO"), 7), None).unwrap();
        assert!(why.contains("a FIFO"), "{why}");
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
