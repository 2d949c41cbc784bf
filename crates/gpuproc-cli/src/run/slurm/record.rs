//! The files a Slurm run and its jobs' wrappers share through the shared filesystem, in
//! the run's state directory: a batch file per array submission (what each task runs; a job
//! step gets its task on the command line instead), and a record per finished task (how it
//! ran), written atomically (temp file, fsync, rename) so that the runner reads either
//! nothing or a whole record. A job step's other files (Slurm's messages, its step id, its
//! output without `--logs`) are its job slot's, reused from step to step: creating files is
//! what costs on a shared filesystem's metadata server, and on a local one too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What one array submission (or one job step) runs: task `i` runs `tasks[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFile {
    /// Seconds between SIGTERM and SIGKILL for a task that timed out or is stopped.
    pub kill_after: f64,
    /// `--logs`: the job's output goes to `<logs>/<seq>.out` and `.err`; `None`: next to
    /// the record, for the runner to print.
    pub logs: Option<PathBuf>,
    /// The tasks.
    pub tasks: Vec<TaskSpec>,
}

/// One task: a job's attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The job's sequence number.
    pub seq: usize,
    /// 1 for the first run, 2 for the first retry, ...
    pub attempt: u32,
    /// `{%}` / `GPUPROC_JOB_SLOT`.
    pub slot: usize,
    /// The shell command, placeholders filled in.
    pub command: String,
    /// Environment additions (a TOML job's `env`).
    pub env: BTreeMap<String, String>,
    /// Seconds before the wrapper stops the command.
    pub timeout: Option<f64>,
}

/// How a task ran, written by its wrapper on its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job's sequence number.
    pub seq: usize,
    /// The attempt.
    pub attempt: u32,
    /// The node it ran on.
    pub node: String,
    /// `CUDA_VISIBLE_DEVICES` as Slurm set it (`None`: unset).
    pub cuda_visible_devices: Option<String>,
    /// The node's numbers of those GPUs: `N` of `/dev/nvidiaN` (NVML's minor number, else
    /// its index), the numbers `SLURM_STEP_GPUS` gives, whether or not Slurm renumbered
    /// `CUDA_VISIBLE_DEVICES` (empty when NVML could not say).
    pub gpus: Vec<u32>,
    /// Their UUIDs.
    pub uuids: Vec<String>,
    /// Start, seconds since the Unix epoch.
    pub start: f64,
    /// Run time in seconds.
    pub runtime: f64,
    /// Exit status; -1 when a signal ended it.
    pub exit: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
    /// Whether the wrapper stopped it for running past its timeout.
    pub timed_out: bool,
    /// Highest GPU memory seen in use by its processes (sampled each second).
    pub peak_memory: Option<u64>,
    /// Its GPU accounting from the same samples, as a local run's (`None`: a task without
    /// GPUs, or a record from an older wrapper).
    #[serde(default)]
    pub gpu: Option<gpuproc::gpu::GpuAccounting>,
    /// `SLURM_JOB_ID` (an array task has one of its own), and the step when in one.
    pub slurm_job: String,
    /// `SLURM_RESTART_COUNT`: times Slurm requeued it before this run.
    pub restarts: u32,
}

/// The batch file of submission `n` in `dir`.
pub fn batch_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("b{n}.json"))
}

/// Where task `task` of the batch at `batch` keeps its record (`.rec.json`), its output
/// without `--logs` (`.out`, `.err`) and Slurm's own messages (`.slurm`): `b<n>.<task>`
/// plus the extension.
pub fn task_file(batch: &Path, task: usize, ext: &str) -> PathBuf {
    let stem = batch
        .file_stem()
        .map_or_else(|| "b".into(), |s| s.to_string_lossy().into_owned());
    batch.with_file_name(format!("{stem}.{task}.{ext}"))
}

/// The batch file's stem and the task of a record's file name (`b<n>.<task>.rec.json`, as
/// [`task_file`] makes it); `None` for any other name, including aside names.
pub fn parse_record_name(name: &str) -> Option<(&str, usize)> {
    let (stem, task) = name.strip_suffix(".rec.json")?.rsplit_once('.')?;
    let canonical = !task.is_empty()
        && task.bytes().all(|b| b.is_ascii_digit())
        && (task == "0" || !task.starts_with('0'));
    if stem.is_empty() || !canonical {
        return None;
    }
    Some((stem, task.parse().ok()?))
}

/// The file `ext` of job slot `slot` in the state directory `dir` (`s<slot>.<ext>`): a job
/// step's Slurm messages (`slurm`), step id (`step`) and, without `--logs`, output (`out`,
/// `err`). One step at a time uses a slot, so the runner reads them before the next step
/// of the slot truncates them.
pub fn slot_file(dir: &Path, slot: usize, ext: &str) -> PathBuf {
    dir.join(format!("s{slot}.{ext}"))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then (when
/// `durable`) fsync, rename over `path`, and (when `durable`) fsync of the directory (best
/// effort). Readers see nothing or the whole file either way; `durable` also keeps it
/// through a crash of the machine. Records are durable; batch files, which the runner
/// writes just before starting their tasks, need not be (an fsync per job step would
/// hold up every launch behind the disk).
///
/// # Errors
/// When the file cannot be written or renamed.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    // A name of its own, created exclusively and never through a link: the directory may
    // be on a filesystem others can write (a group's scratch space).
    let (tmp, mut file) = create_aside(path, &name)?;
    let written = (|| {
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent().filter(|_| durable) {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// A new file beside `path` (`.NAME.PID.N.tmp`), created with `O_EXCL | O_NOFOLLOW`; a
/// name someone left or planted is skipped.
fn create_aside(path: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// Reads the record at `path`: `Ok(None)` when there is none (yet).
///
/// # Errors
/// A record that cannot be read or parsed (names the file).
pub fn read_record(path: &Path) -> anyhow::Result<Option<Record>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: not a task record: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_parse_back_to_their_task_and_nothing_else_does() {
        let batch = batch_path(Path::new("/state"), 3);
        for task in [0, 7, 12, 999_999] {
            let file = task_file(&batch, task, "rec.json");
            let name = file.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_record_name(name), Some(("b3", task)));
        }
        for name in [
            "b3.7.out",
            "b3.rec.json",
            ".rec.json",
            "b3..rec.json",
            "b3.07.rec.json",
            "b3.+7.rec.json",
            "b3.-1.rec.json",
            "b3.99999999999999999999999.rec.json",
            ".b3.7.rec.json.123.4.tmp",
        ] {
            assert_eq!(parse_record_name(name), None, "{name}");
        }
    }

    #[test]
    fn links_planted_at_the_aside_names_are_never_written_through() {
        let dir = std::env::temp_dir().join(format!("gpuproc-aside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let pid = std::process::id();
        for n in 0..2000 {
            let aside = dir.join(format!(".r.json.{pid}.{n}.tmp"));
            std::os::unix::fs::symlink(&victim, aside).unwrap();
        }
        let target = dir.join("r.json");
        let got = write_atomic(&target, b"new", true);
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(got.is_err(), "every aside name was taken: {got:?}");
        assert!(!target.exists());
        // Once names are free again, the write goes through.
        for n in 0..2000 {
            let _ = std::fs::remove_file(dir.join(format!(".r.json.{pid}.{n}.tmp")));
        }
        write_atomic(&target, b"new", true).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_and_atomic_round_trip() {
        let dir = std::env::temp_dir().join(format!("gpuproc-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let batch = batch_path(&dir, 3);
        assert_eq!(batch, dir.join("b3.json"));
        let rec = task_file(&batch, 7, "rec.json");
        assert_eq!(rec, dir.join("b3.7.rec.json"));
        assert_eq!(read_record(&rec).unwrap(), None);
        let record = Record {
            seq: 8,
            attempt: 1,
            node: "n1".into(),
            cuda_visible_devices: Some("2".into()),
            gpus: vec![2],
            uuids: vec!["GPU-x".into()],
            start: 1.5,
            runtime: 0.25,
            exit: 0,
            signal: 0,
            timed_out: false,
            peak_memory: None,
            gpu: Some(gpuproc::gpu::GpuAccounting {
                first_ms: Some(1_500),
                mean_sm_percent: Some(12.5),
                energy_mj: Some(9),
                ..Default::default()
            }),
            slurm_job: "12".into(),
            restarts: 0,
        };
        // A record of an older wrapper, without accounting, still reads.
        let mut old = serde_json::to_value(&record).unwrap();
        old.as_object_mut().unwrap().remove("gpu");
        write_atomic(&rec, &serde_json::to_vec(&old).unwrap(), true).unwrap();
        assert_eq!(read_record(&rec).unwrap().unwrap().gpu, None);
        write_atomic(&rec, &serde_json::to_vec(&record).unwrap(), true).unwrap();
        assert_eq!(read_record(&rec).unwrap(), Some(record));
        // Only the record is left: the temporary file was renamed.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::write(&rec, "{").unwrap();
        let err = read_record(&rec).unwrap_err().to_string();
        assert!(
            err.contains("b3.7.rec.json") && err.contains("not a task record"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
