//! `gpuproc __slurm-job BATCH [TASK]`: what each Slurm task of `gpuproc run --slurm` runs on
//! its node. It runs the task's command as `sh -c` in a process group of its own (as the
//! local runner does), stops it at its timeout (SIGTERM, then SIGKILL after `kill_after`),
//! passes SIGTERM/SIGINT from Slurm (scancel, preemption) on to it, samples its GPU use
//! each second, and writes the task's [`Record`] (node, the GPUs Slurm gave it, times, exit
//! status, peak memory and GPU accounting, as the local runner's) next to the batch file
//! before exiting with the command's status.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use gpuproc::time::saturating_add;

use super::record::{self, BatchFile, Record};
use crate::run::sys::{self, Exit, Sig, Signals};

/// How often the command's GPU use is sampled.
const SAMPLE: Duration = Duration::from_secs(1);

/// Arguments of the hidden `__slurm-job` subcommand.
#[derive(Debug, clap::Args)]
pub struct SlurmJobArgs {
    /// The batch file.
    pub batch: PathBuf,
    /// The task (default: `SLURM_ARRAY_TASK_ID`).
    pub task: Option<usize>,
    /// The batch file's contents (a job step's one task): BATCH is then not read, it names
    /// where the record goes; the step id and, without `--logs`, the output go to the task's
    /// job slot's files ([`record::slot_file`]).
    #[arg(long)]
    pub inline: Option<String>,
}

/// Runs the task and exits with its status (128 + N when signal N ended it).
///
/// # Errors
/// A batch file that cannot be read, a task it does not have, a command that cannot be
/// started, a record that cannot be written.
pub fn run(args: &SlurmJobArgs) -> anyhow::Result<()> {
    let text = match &args.inline {
        Some(text) => text.clone(),
        None => std::fs::read_to_string(&args.batch)
            .with_context(|| format!("reading batch file {}", args.batch.display()))?,
    };
    let batch: BatchFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a batch file", args.batch.display()))?;
    let task = match args.task {
        Some(t) => t,
        None => {
            let id = std::env::var("SLURM_ARRAY_TASK_ID")
                .context("no task given and SLURM_ARRAY_TASK_ID is not set")?;
            id.parse()
                .with_context(|| format!("SLURM_ARRAY_TASK_ID={id:?} is not a task number"))?
        }
    };
    let Some(spec) = batch.tasks.get(task) else {
        bail!(
            "{} has {} tasks; there is no task {task}",
            args.batch.display(),
            batch.tasks.len()
        );
    };
    let record_path = record::task_file(&args.batch, task, "rec.json");
    // A step's own files are its slot's (see `record::slot_file`), an array task's its own.
    let state = args.batch.parent().unwrap_or(std::path::Path::new("."));
    let own = |ext: &str| match args.inline {
        Some(_) => record::slot_file(state, spec.slot, ext),
        None => record::task_file(&args.batch, task, ext),
    };
    let (out_path, err_path) = match &batch.logs {
        Some(dir) => (
            dir.join(format!("{}.out", spec.seq)),
            dir.join(format!("{}.err", spec.seq)),
        ),
        None => (own("out"), own("err")),
    };
    let open = |path: &PathBuf| {
        File::create(path)
            .map(Stdio::from)
            .with_context(|| format!("creating log {}", path.display()))
    };
    let (stdout, stderr) = (open(&out_path)?, open(&err_path)?);

    let node = std::env::var("SLURMD_NODENAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned()
        });
    let cuda_visible_devices = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    // The GPUs Slurm gave, by the node's numbers and UUIDs (none without NVML), read through
    // Slurm's renumbering (gpu::visible). A task without GPUs does not load NVML at all.
    let (gpus, uuids): (Vec<u32>, Vec<String>) = match cuda_visible_devices
        .as_ref()
        .map(|_| gpuproc::gpu::visible())
    {
        Some(Ok(visible)) => visible
            .devices
            .iter()
            .map(|d| {
                let number = d.device.minor_number.unwrap_or(d.device.index);
                (number, d.device.uuid.clone().unwrap_or_default())
            })
            .unzip(),
        _ => (Vec::new(), Vec::new()),
    };
    let sampling = !gpus.is_empty();

    let mut env: BTreeMap<String, String> = spec.env.clone();
    env.insert("GPUPROC_JOB_SEQ".into(), spec.seq.to_string());
    env.insert("GPUPROC_JOB_SLOT".into(), spec.slot.to_string());
    env.insert("GPUPROC_JOB_ATTEMPT".into(), spec.attempt.to_string());

    if let (Some(_), Ok(job), Ok(step)) = (
        args.task,
        std::env::var("SLURM_JOB_ID"),
        std::env::var("SLURM_STEP_ID"),
    ) {
        // A job step's id, for the runner to signal it through Slurm (`scancel
        // --signal=TERM`): srun itself answers SIGTERM by killing its step outright.
        let _ = std::fs::write(own("step"), format!("{job}.{step}"));
    }
    let mut signals = Signals::install().context("installing signal handlers")?;
    let start = Instant::now();
    let start_wall = SystemTime::now();
    let pid = sys::spawn(&spec.command, &env, stdout, stderr)
        .with_context(|| format!("starting `sh -c {}`", spec.command))?;
    let kill_after = crate::units::seconds(batch.kill_after);
    let deadline = spec
        .timeout
        .map(|t| saturating_add(start, crate::units::seconds(t)));
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut peak: Option<u64> = None;
    let mut accountant = gpuproc::gpu::GpuAccountant::default();
    // As in a local run: the first sample a second after the start.
    let mut next_sample = saturating_add(start, SAMPLE);
    let exit = 'wait: loop {
        while let Some((reaped, exit)) = sys::reap_any().context("waiting for the job")? {
            if reaped == pid {
                break 'wait exit;
            }
        }
        let now = Instant::now();
        if sampling && now >= next_sample {
            if let Ok(usage) = gpuproc::gpu::usage_detailed(pid, true) {
                accountant.record(gpuproc::gpu::now_ms(), &usage);
                peak = Some(peak.unwrap_or(0).max(usage.total_memory()));
            }
            next_sample = saturating_add(now, SAMPLE);
        }
        match kill_at {
            Some(at) if at <= now => {
                sys::signal_group(pid, Sig::Kill);
                kill_at = Some(saturating_add(now, Duration::from_secs(3600)));
            }
            None if deadline.is_some_and(|d| d <= now) => {
                timed_out = true;
                sys::signal_group(pid, Sig::Term);
                kill_at = Some(saturating_add(now, kill_after));
            }
            _ => {}
        }
        let wake = [
            Some(next_sample).filter(|_| sampling),
            kill_at,
            deadline.filter(|_| kill_at.is_none()),
        ]
        .into_iter()
        .flatten()
        .min();
        let received = signals
            .wait(wake.map(|w| w.saturating_duration_since(Instant::now())))
            .context("waiting for the job")?;
        if (received.interrupt || received.terminate) && kill_at.is_none() {
            // scancel, preemption, or the job's time limit: the command gets SIGTERM too.
            sys::signal_group(pid, Sig::Term);
            kill_at = Some(saturating_add(Instant::now(), kill_after));
        }
    };
    // What the command left in its group goes with it, as in a local run.
    sys::signal_group(pid, Sig::Kill);
    let (code, signal) = match exit {
        Exit::Code(c) => (c, 0),
        Exit::Signal(s) => (-1, s),
    };
    let slurm_job = match (
        std::env::var("SLURM_JOB_ID").ok(),
        std::env::var("SLURM_STEP_ID").ok(),
    ) {
        (Some(job), Some(step)) if args.task.is_some() => format!("{job}.{step}"),
        (Some(job), _) => job,
        (None, _) => String::new(),
    };
    let record = Record {
        seq: spec.seq,
        attempt: spec.attempt,
        node,
        cuda_visible_devices,
        gpus,
        uuids,
        start: start_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        runtime: start.elapsed().as_secs_f64(),
        exit: code,
        signal,
        timed_out,
        peak_memory: peak,
        gpu: sampling.then(|| accountant.accounting()),
        slurm_job,
        restarts: std::env::var("SLURM_RESTART_COUNT")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
    };
    let bytes = serde_json::to_vec(&record).context("encoding the task record")?;
    record::write_atomic(&record_path, &bytes, true)
        .with_context(|| format!("writing task record {}", record_path.display()))?;
    let status = match exit {
        Exit::Code(c) => u8::try_from(c).unwrap_or(1),
        Exit::Signal(s) => u8::try_from(128 + s.clamp(0, 127)).unwrap_or(255),
    };
    drop(signals);
    std::process::exit(i32::from(status));
}
