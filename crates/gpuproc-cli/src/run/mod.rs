//! `gpuproc run`: a job runner that spreads shell commands over GPUs.
//!
//! - [`jobs`]: the job list (files, stdin, templates), pure;
//! - [`slots`]: where GPUs come from, and the per-job leases jobs run under (why per job
//!   rather than one lease for the run: see there);
//! - [`schedule`]: which job runs where next, and retries, pure;
//! - [`exec`]: processes, timeouts, signals, logs (its system calls in [`sys`]);
//! - [`joblog`]: GNU parallel's job log and `--resume`; [`summary`]: the final table;
//! - [`slurm`]: the same jobs executed by Slurm (`--slurm`): job steps or job arrays.

pub mod exec;
pub mod joblog;
pub mod jobs;
pub mod schedule;
pub mod slots;
pub mod slurm;
pub mod summary;
pub mod sys;

use std::fmt;
use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use exec::{Executor, Progress, Settings};
use gpuproc::gpu::Criteria;
use jobs::{Format, Job};
use schedule::Scheduler;
use slots::{GpuSource, Leaser, NvmlSource, Selection};
use summary::SummaryRows;

use crate::units::OrderArg;

/// Exit status when at least one job failed.
pub const EXIT_JOBS_FAILED: u8 = 3;
/// Exit status when the run was interrupted (Ctrl-C, SIGTERM, SIGHUP).
pub const EXIT_INTERRUPTED: u8 = 130;

const RUN_HELP: &str = "Jobs:
  gpuproc run -f jobs.txt                 one shell command per line (# comments)
  gpuproc run -f jobs.toml                [[job]] cmd = \"...\", gpus, env, retries, timeout
  gpuproc run < jobs.txt                  commands from standard input
  gpuproc run -- python train.py --lr {1} --seed {2} ::: 0.1 0.01 ::: 1 2 3
  ls *.cfg | gpuproc run -- python train.py --config {}
Placeholders (templates only, as GNU parallel): {} all arguments, {1} {2} ... one of them,
{#} the job's number, {%} its slot number. Arguments are shell-quoted.

Each job runs as `sh -c COMMAND` in its own process group, with CUDA_VISIBLE_DEVICES and
NVIDIA_VISIBLE_DEVICES set to the UUIDs of its GPUs, and GPUPROC_JOB_SEQ, GPUPROC_JOB_SLOT,
GPUPROC_JOB_ATTEMPT. When a job's shell exits, what it left in its process group is killed.

GPU leases: each job leases its GPUs when it starts and releases them when it ends, in the
same table as `gpuproc pick` (see `gpuproc pick --help`), with --per-gpu as the lease's
share limit. A GPU leased by someone else (another run, `gpuproc pick --hold`, a pool) gets
no job; nor does one that fails --min-free, --max-util or --no-foreign when the job would
start (this run's own jobs count towards a GPU's memory and utilisation, not as foreign
processes). Per-job leases rather than one for the whole run: the run takes GPUs only while
it has work for them, grows onto GPUs others free, and judges each GPU when work is handed
out rather than once at the start. While its jobs run, the run waits for GPUs as they end;
when none of its jobs runs and no GPU can be leased, it waits up to --wait (default: not at
all) and then leaves the remaining jobs unstarted (exit status 3). --dry-run takes no leases.

Summary and accounting: while a job runs, its process tree's GPU use is sampled each second
(NVML: its processes' memory and SM utilisation, its GPUs' energy counters). For each attempt:
  GPU window   the first and last sample with the job on a GPU
  peak mem     the most memory at one sample, all its GPUs together (the summary's: over
               all attempts)
  mean         the time-weighted mean memory over the window (samples in it without the
               job on a GPU count as 0)
  SM%          the time-weighted mean SM utilisation, percent of one GPU (the mean over its
               GPUs), from the driver's per-process samples (none under MIG)
  energy       what the GPUs' energy counters advanced between samples with the job on them,
               only when no other process (another user's, another job of this run with
               --per-gpu) was seen on its GPUs in the window: the counter measures the whole
               GPU. None before Volta, or with fewer than two samples (jobs under ~2s).
The summary table shows them for the last attempt, leaving out columns no job has a figure
for; the job log has each attempt's after GNU parallel's columns (GpuStart GpuEnd, seconds
since the epoch; GpuPeakMem GpuMeanMem, bytes; GpuMeanSM, percent; GpuEnergy, joules; empty
when unknown); --json has them per job under \"gpu\" (first_ms, last_ms, samples,
peak_memory, mean_memory, mean_sm_percent, energy_mj, shared). Activity between samples and
jobs shorter than a second go unseen.

Ctrl-C once: start no more jobs and send SIGINT to running ones; twice: kill them.
SIGTERM/SIGHUP: start no more jobs, send SIGTERM, SIGKILL after --kill-after.

Clusters (--slurm): the same jobs, --gpus-per-job, --retries, --timeout, --logs, --joblog and
--resume, run by Slurm:
  inside an allocation (SLURM_JOB_ID set: salloc, an sbatch script), each job is a step,
    `srun --exact -N1 -n1 --cpus-per-task=1 --gres=gpu:N`, at most as many at once as the
    allocation has CPUs and GPUs for, or --max-running;
  outside one, the jobs are submitted as job arrays, `sbatch --array=0-N%K` (K: --max-running,
    the throttle; none without it), one per GPU count and at most MaxArraySize tasks each (the
    next array goes in once the previous has no pending task, never exceeding K). One `squeue`
    for all arrays per poll, every 0.25s backing off to 5s while nothing changes; a job that
    succeeded is seen as soon as its record is written (inotify, on the runner's node), a
    failed one at the next poll. Failed jobs with retries left go into a new array.
  --partition and --slurm-opt ARG go to sbatch (arrays) or srun (steps), after gpuproc's own.
  Each task runs `gpuproc __slurm-job` (this binary, at the same path on the nodes: a shared
  filesystem), which runs the job with Slurm's CUDA_VISIBLE_DEVICES, enforces --timeout, and
  records its node, GPUs (the node's numbers, N of /dev/nvidiaN, and UUIDs), times, exit
  status and GPU accounting (as locally: peak and mean memory, SM%, energy).
  GPU numbers: without device confinement CUDA_VISIBLE_DEVICES holds the node's numbers, as
  SLURM_STEP_GPUS does; with it (task/cgroup, ConstrainDevices=yes) the job sees only its
  GPUs and Slurm numbers them from 0 (SLURM_STEP_GPUS=2,3 gives CUDA_VISIBLE_DEVICES=0,1).
  gpuproc reads CUDA_VISIBLE_DEVICES against the GPUs the process may open, as CUDA does;
  where NVML lists more GPUs than the job's while Slurm renumbered, entry C is the C-th of
  SLURM_STEP_GPUS (or SLURM_JOB_GPUS) in ascending order. The job log and records name GPUs
  by the node's numbers and UUIDs, never by the renumbered ones.
  --logs DIR: DIR/<seq>.out and .err, as locally; without it each job's output is printed when
  it ends. Slurm's own messages and each task's record (node, GPU UUIDs,
  times, GPU accounting) go to DIR/.slurm/<run>/; without --logs to ./.gpuproc-slurm/<run>/,
  kept only when a job failed. The job log's Host column is NODE/GPUS (`node7/2,3`); the
  summary has a node column; --resume works across runs as locally.
  Ctrl-C: scancel the arrays and wait until squeue no longer lists them (steps: scancel
  --signal=TERM, recorded by the wrappers); again: leave at once (steps: cancel them).
  Preemption: a requeued task (preemption with requeue, scontrol requeue) is not a failure,
  only its last run counts; tasks preempted or lost to a node failure without requeue are
  submitted again without using a retry, and are not counted as failures. A runner killed with SIGKILL cannot cancel: `scancel
  --name=gpuproc`.

Exit status:
  0    every job succeeded
  1    error (bad job file, no GPUs, ...)
  2    no NVIDIA driver or NVML library (use --cpu-only)
  3    at least one job failed
  64   bad command line
  130  interrupted

Environment:
  GPUPROC_RUNTIME_DIR  directory of the GPU lease table
  GPUPROC_NVML_LIB     path of the libnvidia-ml to load instead of libnvidia-ml.so.1";

/// Options of `gpuproc run`.
#[derive(Debug, clap::Args)]
#[command(after_help = RUN_HELP)]
pub struct RunArgs {
    /// Read jobs from FILE (`-`: standard input). With a template, each line is one argument.
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Job file format; `auto`: TOML for files named *.toml, else one command per line.
    #[arg(long, value_enum, default_value_t = FileFormat::Auto, value_name = "FORMAT")]
    pub format: FileFormat,

    /// GPUs to use: `all`, or NVML indices or UUIDs separated by commas (`0,1,3`).
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = Selection::parse)]
    pub gpus: Selection,

    /// Jobs sharing each GPU at once.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_gpu: u32,

    /// GPUs each job gets (a TOML job's `gpus` overrides it).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus_per_job: usize,

    /// Run without GPUs: N slots (-j), no CUDA_VISIBLE_DEVICES, no NVML needed.
    #[arg(long)]
    pub cpu_only: bool,

    /// At most N jobs at once (with --cpu-only: default the number of CPUs).
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: Option<u32>,

    /// Retry a job that exits non-zero, is killed by a signal or times out, up to N times,
    /// on other GPUs when there are any.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,

    /// Stop a job after SECONDS: SIGTERM, then SIGKILL after --kill-after.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<f64>,

    /// Seconds between SIGTERM and SIGKILL for a job that timed out or is being stopped.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = parse_seconds)]
    pub kill_after: f64,

    /// Write each job's output to DIR/<job>.out and DIR/<job>.err (the latest attempt's),
    /// instead of the runner's standard output and error.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,

    /// Append a line per attempt to FILE, in GNU parallel's --joblog format.
    #[arg(long, value_name = "FILE")]
    pub joblog: Option<PathBuf>,

    /// Skip jobs that --joblog records as succeeded (failed or interrupted ones run again).
    #[arg(long, requires = "joblog")]
    pub resume: bool,

    /// Start a job only on GPUs with at least SIZE of free memory (500MiB, 10GiB, 10G =
    /// 10GiB, 1.5TB = 1.5e12 bytes), as measured when it starts.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size, conflicts_with = "cpu_only")]
    pub min_free: Option<u64>,

    /// Start a job only on GPUs at most PCT percent utilized when it starts.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(0..=100), conflicts_with = "cpu_only")]
    pub max_util: Option<u32>,

    /// Start a job only on GPUs where no process other than this run's jobs runs.
    #[arg(long, conflicts_with = "cpu_only")]
    pub no_foreign: bool,

    /// Which qualifying GPUs a job gets first.
    #[arg(long, value_enum, default_value_t = OrderArg::MostFree, value_name = "ORDER", conflicts_with = "cpu_only")]
    pub order: OrderArg,

    /// When none of this run's jobs runs and no GPU can be leased, wait up to DURATION
    /// (30s, 5m, 1h30m, a bare number of seconds, or `forever`) before giving up on the
    /// remaining jobs.
    #[arg(long, value_name = "DURATION", value_parser = parse_wait, conflicts_with = "cpu_only")]
    pub wait: Option<Duration>,

    /// Same as --no-foreign --wait forever: give jobs only GPUs that no other process
    /// uses, waiting for them as long as it takes.
    #[arg(long, conflicts_with = "cpu_only")]
    pub wait_free: bool,

    /// Print which jobs would run, and where, without running anything: the GPUs the run
    /// would give each job if it started now (the same choice on the GPUs and leases as
    /// they are now), assuming every job succeeds; `?` for jobs that would wait for GPUs.
    #[arg(long)]
    pub dry_run: bool,

    /// No progress bar or progress lines (the summary's totals line is still printed).
    #[arg(short, long)]
    pub quiet: bool,

    /// Which jobs the final summary table lists.
    #[arg(long, value_enum, default_value_t = SummaryRows::Auto, value_name = "ROWS")]
    pub summary: SummaryRows,

    /// Print the summary as JSON on standard output when the run ends (one line, after
    /// every job's output), instead of the table; the totals line still goes to standard
    /// error. See "Summary and accounting" below.
    #[arg(long, conflicts_with = "dry_run")]
    pub json: bool,

    /// Run the jobs through Slurm: as `srun --exact` job steps inside an allocation
    /// (SLURM_JOB_ID set), else as `sbatch` job arrays (see Clusters below).
    #[arg(long, conflicts_with_all = ["dry_run", "gpus", "per_gpu", "min_free", "max_util", "no_foreign", "order", "wait", "wait_free"])]
    pub slurm: bool,

    /// With --slurm: the partition the job arrays are submitted to.
    #[arg(long, value_name = "P", requires = "slurm")]
    pub partition: Option<String>,

    /// With --slurm: one more option for `sbatch` (arrays) or `srun` (steps), after
    /// gpuproc's own (`--slurm-opt=--time=10`, `--slurm-opt=--account=A`); repeatable.
    #[arg(
        long = "slurm-opt",
        value_name = "ARG",
        requires = "slurm",
        allow_hyphen_values = true
    )]
    pub slurm_opt: Vec<String>,

    /// With --slurm: at most K jobs running at once (the array throttle `%K`, or the most
    /// job steps at once); default: as many as Slurm gives (steps: the allocation's CPUs).
    /// -j N means the same.
    #[arg(long, value_name = "K", requires = "slurm", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: Option<u32>,

    /// The command template, then `:::` and argument lists; without a template, jobs are
    /// whole commands from --file or standard input.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileFormat {
    /// By the file name.
    Auto,
    /// One command per line.
    Lines,
    /// TOML `[[job]]` tables.
    Toml,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    if ["forever", "inf", "infinity"].contains(&s.trim().to_ascii_lowercase().as_str()) {
        return Ok(Duration::MAX);
    }
    crate::units::parse_duration(s)
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number of seconds, got {s:?}")),
    }
}

/// Jobs failed or the run was interrupted: `main` turns this into the exit status after
/// the summary has been printed.
#[derive(Debug)]
pub struct RunFailed {
    /// Jobs that did not succeed.
    pub failed: usize,
    /// Whether the run was interrupted.
    pub interrupted: bool,
}

impl RunFailed {
    /// The process exit status.
    pub fn exit_code(&self) -> u8 {
        if self.interrupted {
            EXIT_INTERRUPTED
        } else {
            EXIT_JOBS_FAILED
        }
    }
}

impl fmt::Display for RunFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.interrupted {
            write!(f, "interrupted")
        } else {
            write!(
                f,
                "{} job{} failed",
                self.failed,
                if self.failed == 1 { "" } else { "s" }
            )
        }
    }
}

impl std::error::Error for RunFailed {}

/// A command line that makes no sense: `main` prints it and exits with
/// [`EXIT_USAGE`](crate::cli::EXIT_USAGE), as for the errors clap finds.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// "first", "second", … "10th".
fn ordinal(n: usize) -> String {
    match n {
        1 => "first".into(),
        2 => "second".into(),
        3 => "third".into(),
        _ => format!("{n}th"),
    }
}

/// Reads the job list the arguments describe.
fn load_jobs(args: &RunArgs) -> anyhow::Result<Vec<Job>> {
    let read_input = |path: &Option<PathBuf>| -> anyhow::Result<(String, String)> {
        match path {
            Some(p) if p.as_os_str() != "-" => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading job file {}", p.display()))?;
                Ok((text, p.display().to_string()))
            }
            _ => {
                if io::stdin().is_terminal() {
                    eprintln!("gpuproc: reading jobs from standard input (Ctrl-D to end)");
                }
                let mut text = String::new();
                io::stdin()
                    .read_to_string(&mut text)
                    .context("reading jobs from standard input")?;
                Ok((text, "standard input".to_owned()))
            }
        }
    };
    let (template, lists) = jobs::split_template(&args.command);
    if template.is_empty() && !lists.is_empty() {
        return Err(UsageError(
            "`:::` without a command template before it; expected COMMAND ... ::: ARGS".into(),
        )
        .into());
    }
    if let Some(n) = lists.iter().position(Vec::is_empty) {
        return Err(UsageError(format!(
            "the {} `:::` list is empty: give each `:::` at least one argument \
             (COMMAND ... ::: ARGS)",
            ordinal(n + 1)
        ))
        .into());
    }
    let jobs = if template.is_empty() {
        let (text, source) = read_input(&args.file)?;
        let format = match args.format {
            FileFormat::Lines => Format::Lines,
            FileFormat::Toml => Format::Toml,
            FileFormat::Auto => match &args.file {
                Some(p) if p.extension().is_some_and(|e| e == "toml") => Format::Toml,
                _ => Format::Lines,
            },
        };
        jobs::parse(&text, format, &source)?
    } else if !lists.is_empty() {
        if args.file.is_some() {
            return Err(UsageError(
                "give arguments either after `:::` or with --file, not both".into(),
            )
            .into());
        }
        jobs::expand(&template, &jobs::cartesian(&lists))?
    } else {
        let (text, _) = read_input(&args.file)?;
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| vec![l.to_owned()])
            .collect();
        jobs::expand(&template, &rows)?
    };
    Ok(jobs)
}

/// What every job's GPUs must meet (the count and devices are set per job); the run and
/// the dry run use the same.
fn criteria(args: &RunArgs) -> Criteria {
    let mut criteria = Criteria::new()
        .max_per_gpu(args.per_gpu)
        .no_foreign_processes(args.no_foreign || args.wait_free)
        .order(args.order.into())
        // The run's GPUs are already chosen (--gpus); each job names its own.
        .within_visible(false);
    if let Some(bytes) = args.min_free {
        criteria = criteria.min_free(bytes);
    }
    if let Some(pct) = args.max_util {
        criteria = criteria.max_utilization(pct);
    }
    criteria
}

/// `--resume`: which jobs the job log records as succeeded (all `false` without it).
///
/// # Errors
/// An unreadable job log, or one whose commands differ from the jobs'.
fn resume_skip(args: &RunArgs, jobs: &[Job]) -> anyhow::Result<Vec<bool>> {
    let mut skip = vec![false; jobs.len()];
    if args.resume {
        if let Some(path) = &args.joblog {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let done = joblog::succeeded(&text, &path.display().to_string())?;
                    for (i, job) in jobs.iter().enumerate() {
                        if let Some(command) = done.get(&job.seq) {
                            if !job.slot_placeholder
                                && command != &job.command.replace(['\t', '\n'], " ")
                            {
                                bail!(
                                    "--resume: job {} in {} was `{command}`, now it is `{}`; \
                                     the job list changed (start a new job log)",
                                    job.seq,
                                    path.display(),
                                    job.command
                                );
                            }
                            skip[i] = true;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("reading job log {}", path.display()))
                }
            }
        }
    }

    Ok(skip)
}

/// Runs `gpuproc run`.
///
/// # Errors
/// Bad input, no GPUs, an unwritable log; [`RunFailed`] when jobs failed or the run was
/// interrupted.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let mut jobs = load_jobs(args)?;
    for job in &mut jobs {
        job.retries.get_or_insert(args.retries);
    }
    if args.slurm {
        return run_slurm(args, &jobs);
    }
    let gpus = if args.cpu_only {
        if let Some(job) = jobs.iter().find(|j| j.gpus.is_some_and(|n| n > 0)) {
            bail!(
                "job {} asks for {} GPUs, but --cpu-only runs without GPUs",
                job.seq,
                job.gpus.unwrap_or(0)
            );
        }
        Vec::new()
    } else {
        let mut source = NvmlSource {
            selection: args.gpus.clone(),
        };
        source.gpus()?
    };
    let needs: Vec<usize> = jobs
        .iter()
        .map(|j| {
            if args.cpu_only {
                0
            } else {
                j.gpus.unwrap_or(args.gpus_per_job)
            }
        })
        .collect();
    if let Some((i, &need)) = needs.iter().enumerate().find(|(_, &n)| n > gpus.len()) {
        bail!(
            "job {} needs {need} GPUs, but only {} {} selected",
            jobs[i].seq,
            gpus.len(),
            if gpus.len() == 1 { "is" } else { "are" }
        );
    }
    let per_gpu = args.per_gpu as usize;
    let max_slots = if args.cpu_only {
        args.max_jobs
            .map_or_else(gpuproc::cpu_count, |j| j as usize)
    } else {
        let capacity = gpus.len() * per_gpu;
        args.max_jobs
            .map_or(capacity, |j| (j as usize).min(capacity))
    };

    let skip = resume_skip(args, &jobs)?;

    let retries: Vec<u32> = jobs.iter().map(|j| j.retries.unwrap_or(0)).collect();
    let scheduler = Scheduler::new(needs, retries, &skip, gpus.len(), per_gpu, max_slots);

    if args.dry_run {
        let mut dry = None;
        let order = if gpus.is_empty() {
            schedule::simulate(scheduler)
        } else {
            // The placement the run would make: the same choice on the same inputs (the
            // GPUs and leases as they are now), as if every job succeeded.
            let placement = dry.insert(slots::DryRun::new(criteria(args), gpus.clone())?);
            schedule::simulate_with(scheduler, placement)
        };
        let mut out = io::stdout().lock();
        writeln!(out, "job\tslot\tgpus\tcommand")?;
        for launch in &order {
            let job = &jobs[launch.job];
            let gpu_list: Vec<String> = launch
                .gpus
                .iter()
                .map(|&g| gpus[g].index.to_string())
                .collect();
            writeln!(
                out,
                "{}\t{}\t{}\t{}",
                job.seq,
                launch.slot,
                if gpu_list.is_empty() {
                    "-".to_owned()
                } else {
                    gpu_list.join(",")
                },
                job.command_for_slot(launch.slot)
            )?;
        }
        let placed: Vec<usize> = order.iter().map(|l| l.job).collect();
        let unplaced: Vec<&Job> = jobs
            .iter()
            .enumerate()
            .filter(|&(i, _)| !skip[i] && !placed.contains(&i))
            .map(|(_, job)| job)
            .collect();
        for job in &unplaced {
            writeln!(out, "{}\t-\t?\t{}", job.seq, job.command)?;
        }
        out.flush()?;
        if let (Some(first), Some(dry)) = (unplaced.first(), &dry) {
            let (why, then) = match (&dry.leaser.error, &dry.leaser.shortage) {
                (Some(e), _) => (e.to_string(), "the run would stop with this error"),
                (None, Some(shortage)) => (
                    shortage
                        .message
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    if shortage.impossible {
                        "the run would leave them unstarted"
                    } else {
                        "the run would wait for GPUs as --wait allows"
                    },
                ),
                (None, None) => (
                    "too few usable GPUs".to_owned(),
                    "the run would leave them unstarted",
                ),
            };
            let _ = writeln!(
                io::stderr(),
                "gpuproc: dry run: job {} and the jobs after it get no GPUs now ({why}); {then}",
                first.seq
            );
        }
        return Ok(());
    }

    if let Some(dir) = &args.logs {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating log directory {}", dir.display()))?;
    }
    let joblog = open_joblog(args)?;
    let progress = progress(args);
    let gpu_mode = !gpus.is_empty();
    let leaser = gpu_mode.then(|| {
        let wait = if args.wait_free {
            Some(Duration::MAX)
        } else {
            args.wait
        };
        Leaser::new(criteria(args), wait)
    });
    let settings = Settings {
        gpus,
        timeout: args.timeout.map(crate::units::seconds),
        kill_after: crate::units::seconds(args.kill_after),
        logs: args.logs.clone(),
        joblog,
        progress,
        leaser,
    };
    let report = Executor::new(&jobs, &skip, scheduler, settings).run()?;
    finish(args, &report, gpu_mode)
}

/// `gpuproc run --slurm`: the jobs, their GPU counts, retries, job log and `--resume` as
/// in a local run, executed by Slurm (see [`slurm`]).
fn run_slurm(args: &RunArgs, jobs: &[Job]) -> anyhow::Result<()> {
    let needs: Vec<usize> = jobs
        .iter()
        .map(|j| {
            if args.cpu_only {
                0
            } else {
                j.gpus.unwrap_or(args.gpus_per_job)
            }
        })
        .collect();
    if args.cpu_only {
        if let Some(job) = jobs.iter().find(|j| j.gpus.is_some_and(|n| n > 0)) {
            bail!(
                "job {} asks for {} GPUs, but --cpu-only runs without GPUs",
                job.seq,
                job.gpus.unwrap_or(0)
            );
        }
    }
    let skip = resume_skip(args, jobs)?;
    if let Some(dir) = &args.logs {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating log directory {}", dir.display()))?;
    }
    let setup = slurm::Setup {
        jobs,
        skip: &skip,
        retries: jobs.iter().map(|j| j.retries.unwrap_or(0)).collect(),
        gpu_mode: needs.iter().any(|&n| n > 0),
        needs,
        timeout: args.timeout,
        kill_after: args.kill_after,
        logs: args.logs.clone(),
        joblog: open_joblog(args)?,
        progress: progress(args),
        options: slurm::SlurmOptions {
            partition: args.partition.clone(),
            opts: args.slurm_opt.clone(),
            max_running: args.max_running.or(args.max_jobs).map(|k| k as usize),
        },
    };
    let gpu_mode = setup.gpu_mode;
    let report = slurm::run(setup)?;
    finish(args, &report, gpu_mode)
}

/// Opens `--joblog` for appending, writing the header into a new one.
fn open_joblog(args: &RunArgs) -> anyhow::Result<Option<joblog::JobLog>> {
    args.joblog.as_deref().map(joblog::JobLog::open).transpose()
}

/// How the run shows progress.
fn progress(args: &RunArgs) -> Progress {
    if args.quiet {
        Progress::Quiet
    } else if io::stderr().is_terminal() {
        Progress::Bar
    } else {
        Progress::Lines
    }
}

/// Prints the summary; [`RunFailed`] when jobs failed or the run was interrupted.
fn finish(args: &RunArgs, report: &exec::Report, gpu_mode: bool) -> anyhow::Result<()> {
    let rows = if args.json {
        SummaryRows::None
    } else {
        args.summary
    };
    if args.json {
        let mut out = io::stdout().lock();
        writeln!(out, "{}", summary::json(report)).context("writing the JSON summary")?;
        out.flush().context("writing the JSON summary")?;
    }
    let text = summary::render(report, rows, gpu_mode);
    let _ = io::stderr().write_all(text.as_bytes());
    if let Some(why) = &report.starved {
        let _ = writeln!(io::stderr(), "gpuproc: {why}");
    }
    let failed = report.outcomes.iter().filter(|o| !o.succeeded()).count();
    if report.interrupted || failed > 0 {
        return Err(RunFailed {
            failed,
            interrupted: report.interrupted,
        }
        .into());
    }
    Ok(())
}
