//! The executor: starts the scheduler's launches as `sh -c` process groups, waits for them
//! (one `poll` on signals and the next deadline), enforces timeouts, forwards Ctrl-C,
//! writes logs and the job log, and samples each job's GPU use for its accounting (see
//! [`GpuAccounting`]). In a GPU run every job starts under a lease from [`Leaser`] and its
//! lease is released when it ends.

use gpuproc::time::saturating_add;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use gpuproc::gpu::{GpuAccountant, GpuAccounting};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::joblog::{Entry, JobLog};
use super::jobs::Job;
use super::schedule::{Launch, Scheduler, Verdict};
use super::slots::{Gpu, Leaser};
use super::sys::{self, Exit, Sig, Signals};

/// How often running jobs' GPU use is sampled.
const MEMORY_SAMPLE: Duration = Duration::from_secs(1);
/// How often a job waiting for GPUs tries to lease them again.
const LEASE_RETRY: Duration = Duration::from_millis(250);

/// What the executor needs besides the jobs and the scheduler.
#[derive(Debug)]
pub struct Settings {
    /// The GPUs the scheduler's positions refer to (empty: CPU-only).
    pub gpus: Vec<Gpu>,
    /// Default timeout per attempt.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL for a job that timed out or was asked to stop.
    pub kill_after: Duration,
    /// Directory for `<seq>.out` / `<seq>.err`; `None`: jobs share the runner's output.
    pub logs: Option<PathBuf>,
    /// The job log, open for appending.
    pub joblog: Option<JobLog>,
    /// How to report progress.
    pub progress: Progress,
    /// Leases GPUs for jobs (`None`: CPU-only).
    pub leaser: Option<Leaser>,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar with ETA (standard error is a terminal).
    Bar,
    /// One line per finished or retried job on standard error.
    Lines,
    /// Nothing.
    Quiet,
}

/// What became of one job.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Sequence number.
    pub seq: usize,
    /// The command of the last attempt.
    pub command: String,
    /// Attempts made (0: never started).
    pub attempts: u32,
    /// How the last attempt ended.
    pub exit: Option<Exit>,
    /// Whether the last attempt ran out of time.
    pub timed_out: bool,
    /// Run time of the last attempt.
    pub runtime: Duration,
    /// Highest GPU memory seen in use by the job's processes, over all attempts.
    pub peak_memory: Option<u64>,
    /// The last attempt's GPU accounting (`None`: not a GPU run, or never started; its
    /// window is `None` when the job was never seen on a GPU).
    pub gpu: Option<GpuAccounting>,
    /// NVML indices of the last attempt's GPUs.
    pub gpus: Vec<u32>,
    /// The node the last attempt ran on (Slurm runs; `None` locally).
    pub node: Option<String>,
    /// Already done in an earlier run (`--resume`).
    pub skipped: bool,
}

impl Outcome {
    /// Whether the job ran and succeeded (or was skipped as done).
    pub fn succeeded(&self) -> bool {
        self.skipped || (self.exit == Some(Exit::Code(0)) && !self.timed_out)
    }
}

/// The end of a run.
#[derive(Debug)]
pub struct Report {
    /// Every job, in sequence order.
    pub outcomes: Vec<Outcome>,
    /// Whether Ctrl-C (or SIGTERM/SIGHUP) stopped the run early.
    pub interrupted: bool,
    /// Why jobs were left unstarted for want of GPUs (past `--wait`), when they were.
    pub starved: Option<String>,
}

struct Running {
    launch: Launch,
    start: Instant,
    start_wall: SystemTime,
    command: String,
    deadline: Option<Instant>,
    kill_at: Option<Instant>,
    timed_out: bool,
    lease: Option<gpuproc::gpu::GpuLease>,
    accountant: GpuAccountant,
}

/// Runs `jobs` as `scheduler` decides.
pub struct Executor<'a> {
    jobs: &'a [Job],
    scheduler: Scheduler,
    settings: Settings,
    running: HashMap<u32, Running>,
    outcomes: Vec<Outcome>,
    bar: Option<ProgressBar>,
    done: usize,
    total: usize,
    /// The GPUs last reported as unavailable, so each change is reported once.
    unavailable: Vec<String>,
    /// Since when nothing runs and the next job cannot get GPUs.
    starved_since: Option<Instant>,
}

impl std::fmt::Debug for Executor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("running", &self.running.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Outcome {
    /// One outcome per job, none started yet; `skip[i]` marks jobs already done.
    pub fn initial(jobs: &[Job], skip: &[bool]) -> Vec<Outcome> {
        jobs.iter()
            .enumerate()
            .map(|(i, job)| Outcome {
                seq: job.seq,
                command: job.command.clone(),
                attempts: 0,
                exit: None,
                timed_out: false,
                runtime: Duration::ZERO,
                peak_memory: None,
                gpu: None,
                gpus: Vec::new(),
                node: None,
                skipped: skip.get(i).copied().unwrap_or(false),
            })
            .collect()
    }
}

/// The progress bar of a run of `total` jobs, when `progress` asks for one.
pub fn progress_bar(progress: Progress, total: usize) -> Option<ProgressBar> {
    (progress == Progress::Bar).then(|| {
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs ({per_sec}, ETA {eta}) {msg}",
        ) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    })
}

impl<'a> Executor<'a> {
    /// An executor for `jobs`; `skip[i]` marks jobs already done.
    pub fn new(jobs: &'a [Job], skip: &[bool], scheduler: Scheduler, settings: Settings) -> Self {
        let outcomes = Outcome::initial(jobs, skip);
        let total = outcomes.iter().filter(|o| !o.skipped).count();
        let bar = progress_bar(settings.progress, total);
        Executor {
            jobs,
            scheduler,
            settings,
            running: HashMap::new(),
            outcomes,
            bar,
            done: 0,
            total,
            unavailable: Vec::new(),
            starved_since: None,
        }
    }

    /// Runs until every job is done or the run is interrupted and its jobs have ended.
    ///
    /// # Errors
    /// When signal handlers cannot be installed, waiting fails, or the job log cannot be
    /// written. Running jobs are killed before the error is returned.
    pub fn run(mut self) -> anyhow::Result<Report> {
        let mut signals = Signals::install().context("installing signal handlers")?;
        let mut stopping = false;
        let mut interrupts = 0;
        let mut next_sample = Instant::now() + MEMORY_SAMPLE;
        let mut starved = None;
        loop {
            let mut retry_at = None;
            if !stopping {
                while let Some(launch) = self.next_launch()? {
                    self.start(launch)?;
                }
                if self.scheduler.queued() > 0 {
                    match self.check_starved() {
                        Ok(retry) => retry_at = retry,
                        Err(why) => {
                            // Printed after the summary, as the run's last word.
                            starved = Some(why);
                            stopping = true;
                            self.scheduler.clear();
                        }
                    }
                }
            }
            if self.running.is_empty() && (stopping || self.scheduler.queued() == 0) {
                break;
            }
            let now = Instant::now();
            let mut wake = self
                .running
                .values()
                .filter_map(|r| r.kill_at.or(r.deadline))
                .chain(retry_at)
                .min();
            if !self.settings.gpus.is_empty() {
                wake = Some(wake.map_or(next_sample, |w| w.min(next_sample)));
            }
            let received = signals
                .wait(wake.map(|w| w.saturating_duration_since(now)))
                .context("waiting for jobs")?;
            if received.interrupt || received.terminate {
                interrupts += 1;
                if !stopping {
                    stopping = true;
                    self.scheduler.clear();
                }
                let (sig, grace) = if received.terminate {
                    (Sig::Term, Some(self.settings.kill_after))
                } else if interrupts == 1 {
                    (Sig::Int, None)
                } else {
                    (Sig::Kill, None)
                };
                self.note(&match sig {
                    Sig::Int => format!(
                        "interrupted: starting no more jobs; SIGINT sent to {} running; Ctrl-C again kills them",
                        self.running.len()
                    ),
                    Sig::Term => format!(
                        "terminating: starting no more jobs; SIGTERM sent to {} running",
                        self.running.len()
                    ),
                    Sig::Kill => format!("killing {} running jobs", self.running.len()),
                });
                let now = Instant::now();
                for (&pid, r) in &mut self.running {
                    sys::signal_group(pid, sig);
                    if let Some(grace) = grace {
                        r.kill_at.get_or_insert(saturating_add(now, grace));
                    }
                }
            }
            while let Some((pid, exit)) = sys::reap_any().context("reaping jobs")? {
                if let Some(running) = self.running.remove(&pid) {
                    // The job is its shell; whatever it left behind in its group goes too.
                    sys::signal_group(pid, Sig::Kill);
                    self.finish(running, exit, stopping)?;
                }
            }
            let now = Instant::now();
            for (&pid, r) in &mut self.running {
                if r.kill_at.is_some_and(|k| k <= now) {
                    sys::signal_group(pid, Sig::Kill);
                    r.kill_at = Some(now + Duration::from_secs(3600));
                } else if r.kill_at.is_none() && r.deadline.is_some_and(|d| d <= now) {
                    r.timed_out = true;
                    sys::signal_group(pid, Sig::Term);
                    r.kill_at = Some(saturating_add(now, self.settings.kill_after));
                }
            }
            if !self.settings.gpus.is_empty() && now >= next_sample {
                self.sample_memory();
                next_sample = now + MEMORY_SAMPLE;
            }
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        Ok(Report {
            outcomes: std::mem::take(&mut self.outcomes),
            interrupted: stopping && starved.is_none(),
            starved,
        })
    }

    fn start(&mut self, launch: Launch) -> anyhow::Result<()> {
        let job = &self.jobs[launch.job];
        let command = job.command_for_slot(launch.slot);
        let mut env: BTreeMap<String, String> = job.env.clone();
        if !self.settings.gpus.is_empty() {
            let uuids: Vec<&str> = launch
                .gpus
                .iter()
                .map(|&g| self.settings.gpus[g].uuid.as_str())
                .collect();
            let list = uuids.join(",");
            env.insert("CUDA_VISIBLE_DEVICES".into(), list.clone());
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), list);
        }
        env.insert("GPUPROC_JOB_SEQ".into(), job.seq.to_string());
        env.insert("GPUPROC_JOB_SLOT".into(), launch.slot.to_string());
        env.insert("GPUPROC_JOB_ATTEMPT".into(), launch.attempt.to_string());
        let (stdout, stderr) = match &self.settings.logs {
            Some(dir) => {
                let open = |ext: &str| {
                    let path = dir.join(format!("{}.{ext}", job.seq));
                    File::create(&path)
                        .map(Stdio::from)
                        .with_context(|| format!("creating log {}", path.display()))
                };
                (open("out")?, open("err")?)
            }
            None => (Stdio::inherit(), Stdio::inherit()),
        };
        let timeout = job
            .timeout
            .map(crate::units::seconds)
            .or(self.settings.timeout);
        let start = Instant::now();
        let start_wall = SystemTime::now();
        let mut lease = self.settings.leaser.as_mut().and_then(|l| l.pending.take());
        // A job on GPUs must be a holder of its lease before its command runs: should the
        // runner be killed at any point, no job runs on GPUs that no lease covers. So it
        // starts behind a gate that opens once its process holds the lease.
        let spawned = if lease.is_some() {
            sys::spawn_gated(&command, &env, stdout, stderr).map(|(pid, gate)| (pid, Some(gate)))
        } else {
            sys::spawn(&command, &env, stdout, stderr).map(|pid| (pid, None))
        };
        match spawned {
            Ok((pid, gate)) => {
                if let (Some(lease), Some(gate)) = (&mut lease, gate) {
                    // The lease lasts while the runner *or* the job runs: a job orphaned by
                    // a killed runner keeps its GPUs.
                    match lease.share_with(pid) {
                        Ok(()) => {
                            // A gate that is gone was killed; its exit status says how.
                            let _ = gate.open();
                        }
                        Err(e) => {
                            // The gate closes: the job exits 125 without running.
                            drop(gate);
                            self.note(&format!(
                                "job {}: not run: it could not be made a holder of its GPU \
                                 lease: {e:?}",
                                job.seq
                            ));
                        }
                    }
                }
                self.running.insert(
                    pid,
                    Running {
                        launch,
                        start,
                        start_wall,
                        command,
                        deadline: timeout.map(|t| saturating_add(start, t)),
                        kill_at: None,
                        timed_out: false,
                        lease,
                        accountant: GpuAccountant::default(),
                    },
                );
            }
            Err(e) => {
                // As a shell reports a command it cannot run.
                self.note(&format!("job {}: cannot start its process: {e}", job.seq));
                let running = Running {
                    launch,
                    start,
                    start_wall,
                    command,
                    deadline: None,
                    kill_at: None,
                    timed_out: false,
                    lease,
                    accountant: GpuAccountant::default(),
                };
                self.finish(running, Exit::Code(127), false)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, mut running: Running, exit: Exit, stopping: bool) -> anyhow::Result<()> {
        let runtime = running.start.elapsed();
        if let Some(lease) = running.lease.take() {
            if let Err(e) = lease.release() {
                self.note(&format!("releasing a GPU lease: {e:?}"));
            }
        }
        let failed = exit != Exit::Code(0) || running.timed_out;
        let verdict = self.scheduler.finish(&running.launch, failed, stopping);
        let job = &self.jobs[running.launch.job];
        let (code, signal) = match exit {
            Exit::Code(c) => (c, 0),
            Exit::Signal(s) => (-1, s),
        };
        let gpu = (!self.settings.gpus.is_empty()).then(|| running.accountant.accounting());
        if let Some(log) = &mut self.settings.joblog {
            let entry = Entry {
                seq: job.seq,
                host: None,
                start: running
                    .start_wall
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                runtime: runtime.as_secs_f64(),
                exit: code,
                signal,
                command: running.command.clone(),
                gpu: gpu.clone(),
            };
            log.write(&entry)?;
        }
        let gpus: Vec<u32> = running
            .launch
            .gpus
            .iter()
            .map(|&g| self.settings.gpus[g].index)
            .collect();
        let outcome = &mut self.outcomes[running.launch.job];
        outcome.command = running.command;
        outcome.attempts = running.launch.attempt;
        outcome.exit = Some(exit);
        outcome.timed_out = running.timed_out;
        outcome.runtime = runtime;
        outcome.gpus = gpus;
        outcome.gpu = gpu;
        let how = describe(exit, running.timed_out);
        let seq = job.seq;
        match verdict {
            Verdict::Retry => {
                let retries = job.retries.unwrap_or(0);
                self.note(&format!(
                    "job {seq} {how}; retrying (retry {} of {retries})",
                    running.launch.attempt
                ));
            }
            Verdict::Done => {
                self.done += 1;
                match (&self.bar, self.settings.progress) {
                    (Some(bar), _) => {
                        bar.inc(1);
                        if failed {
                            bar.println(format!("gpuproc: job {seq} {how}"));
                        }
                    }
                    (None, Progress::Lines) => eprintln!(
                        "gpuproc: [{}/{}] job {seq} {how} in {:.2}s",
                        self.done,
                        self.total,
                        runtime.as_secs_f64()
                    ),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn note(&self, message: &str) {
        match (&self.bar, self.settings.progress) {
            (Some(bar), _) => bar.println(format!("gpuproc: {message}")),
            (None, Progress::Quiet) => {}
            (None, _) => eprintln!("gpuproc: {message}"),
        }
    }

    /// Samples each running job's GPU use: its accounting and peak memory.
    fn sample_memory(&mut self) {
        let Ok(gpus) = gpuproc::gpu::global() else {
            return;
        };
        for (&pid, r) in &mut self.running {
            if let Ok(usage) = gpus.usage_detailed(pid, true) {
                r.accountant.record(gpuproc::gpu::now_ms(), &usage);
                let used = usage.total_memory();
                let peak = &mut self.outcomes[r.launch.job].peak_memory;
                *peak = Some(peak.unwrap_or(0).max(used));
            }
        }
    }
}

impl Executor<'_> {
    /// The next job to start, with its GPUs leased in a GPU run.
    ///
    /// # Errors
    /// When the lease table or NVML cannot be used.
    fn next_launch(&mut self) -> anyhow::Result<Option<Launch>> {
        let Some(leaser) = self.settings.leaser.as_mut() else {
            return Ok(self.scheduler.next());
        };
        leaser.shortage = None;
        let gpus = &self.settings.gpus;
        let launch = self
            .scheduler
            .next_with(|request| leaser.choose(request, gpus));
        for &dead in &leaser.dead {
            self.scheduler.set_available(dead, false);
        }
        if let Some(e) = leaser.error.take() {
            return Err(anyhow::Error::new(e).context("leasing GPUs for a job"));
        }
        if launch.is_some() {
            self.starved_since = None;
        }
        Ok(launch)
    }

    /// After the queue's head could not start: reports GPUs newly unavailable, and says
    /// when to try again (`None`: when a job ends). `Err` with the reason when the run must
    /// give up: nothing of this run is running, and no GPUs can be had within `--wait`.
    fn check_starved(&mut self) -> Result<Option<Instant>, String> {
        let Some(leaser) = self.settings.leaser.as_ref() else {
            return Ok(None);
        };
        let Some(shortage) = leaser.shortage.clone() else {
            if !self.running.is_empty() {
                return Ok(None);
            }
            // Nothing runs, yet the scheduler offered no GPUs: too few can ever qualify.
            let dead: Vec<String> = leaser
                .dead
                .iter()
                .map(|&g| self.settings.gpus[g].index.to_string())
                .collect();
            return Err(format!(
                "too few usable GPUs left for the next job (GPU {} can never qualify)",
                dead.join(",")
            ));
        };
        let wait = leaser.wait;
        if shortage.unavailable != self.unavailable {
            if !shortage.unavailable.is_empty() {
                self.note(&format!(
                    "waiting for GPUs: {}",
                    shortage.unavailable.join("; ")
                ));
            }
            self.unavailable = shortage.unavailable.clone();
        }
        let now = Instant::now();
        if !self.running.is_empty() {
            self.starved_since = None;
            return Ok(Some(now + LEASE_RETRY));
        }
        let since = *self.starved_since.get_or_insert(now);
        let give_up = |waited: Option<Duration>| {
            let waited = waited.map_or(String::new(), |w| {
                format!(" (after waiting {:.0}s)", w.as_secs_f64())
            });
            format!(
                "no GPUs for the remaining jobs{waited}: {}",
                shortage.message
            )
        };
        if shortage.impossible {
            return Err(give_up(None));
        }
        match wait {
            Some(wait) if now.duration_since(since) < wait => {
                if since == now {
                    self.note(&format!(
                        "waiting{} for GPUs ({})",
                        if wait == Duration::MAX {
                            String::new()
                        } else {
                            format!(" up to {}", crate::units::human(wait))
                        },
                        shortage.message.lines().next().unwrap_or_default()
                    ));
                }
                Ok(Some(now + LEASE_RETRY))
            }
            Some(_) => Err(give_up(Some(now.duration_since(since)))),
            None => Err(give_up(None)),
        }
    }
}

impl Drop for Executor<'_> {
    /// On an early return (an error), no job outlives the runner.
    fn drop(&mut self) {
        for &pid in self.running.keys() {
            sys::signal_group(pid, Sig::Kill);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.running.is_empty() && Instant::now() < deadline {
            match sys::reap_any() {
                Ok(Some((pid, _))) => {
                    self.running.remove(&pid);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
    }
}

/// "exited 0", "exited 3", "killed by signal 9", "timed out (killed by signal 15)".
pub fn describe(exit: Exit, timed_out: bool) -> String {
    let base = match exit {
        Exit::Code(c) => format!("exited {c}"),
        Exit::Signal(s) => format!("killed by signal {s}"),
    };
    if timed_out {
        format!("timed out ({base})")
    } else {
        base
    }
}
