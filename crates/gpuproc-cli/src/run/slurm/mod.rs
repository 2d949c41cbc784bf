//! `gpuproc run --slurm`: the same jobs, retries, job log, `--resume` and summary as a
//! local run, executed by Slurm. Two modes, chosen by where the runner is:
//!
//! - inside an allocation (`SLURM_JOB_ID` set): each job is an `srun --exact` step with its
//!   GPUs (`--gres=gpu:N`), at most as many at once as the allocation has CPUs (and GPUs:
//!   the local [`Scheduler`] counts them), or `--max-running`;
//! - outside one: the jobs are submitted as job arrays (`sbatch --array=0-N%K`), one per
//!   GPU count and at most `MaxArraySize` tasks each, and tracked with one `squeue` query
//!   for all of them per poll, at an interval that backs off while nothing changes
//!   ([`policy::next_poll`]). Failed jobs with retries left go into a new array. A task
//!   that succeeded is done the moment its record is renamed into the state directory,
//!   where the kernel tells (inotify: a local or single-node filesystem), without waiting
//!   for `squeue` to stop listing it; a task that failed waits for `squeue` all the same,
//!   which says whether Slurm preempted it (run again, not counted) or it failed.
//!
//! Every task runs under [`wrapper`] (this binary, `gpuproc __slurm-job`, found at the same
//! path on the nodes through the shared filesystem), which writes a [`record::Record`] into
//! the run's state directory; the runner turns records into job-log lines and the summary.

pub mod policy;
pub mod record;
pub mod wrapper;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use indicatif::ProgressBar;

use super::exec::{describe, progress_bar, Outcome, Progress, Report};
use super::joblog::{Entry, JobLog};
use super::jobs::Job;
use super::schedule::{Launch, Scheduler, Verdict};
use super::sys::{self, Exit, Sig, Signals};
use policy::{Batch, TaskState};
use record::{BatchFile, Record, TaskSpec};

/// How long any one Slurm command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a task that Slurm lists as ended may go without a record (its wrapper writes it
/// before exiting; a shared filesystem may show it late) before it counts as failed.
const RECORD_GRACE: Duration = Duration::from_secs(10);
/// How long, after Ctrl-C, the runner waits for cancelled tasks to leave the queue.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// The longest task given to a step's wrapper on its command line (Linux takes 128 KiB in
/// one argument); a longer one goes in a batch file.
const INLINE_MAX: usize = 64 * 1024;

/// A Slurm command that could not be run, failed, or printed something unexpected.
#[derive(Debug)]
pub enum SlurmError {
    /// The command failed: what ran and why (its exit status and standard error, or the
    /// error starting it, or that it did not answer in time).
    Command {
        /// The command line.
        command: String,
        /// Why it failed.
        why: String,
    },
    /// Its output did not parse.
    Output(policy::ParseError),
}

impl fmt::Display for SlurmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlurmError::Command { command, why } => write!(f, "`{command}` failed: {why}"),
            SlurmError::Output(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SlurmError {}

impl From<policy::ParseError> for SlurmError {
    fn from(e: policy::ParseError) -> Self {
        SlurmError::Output(e)
    }
}

/// The command line of `command`, for messages.
fn command_line(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        line.push(' ');
        if arg.is_empty() || arg.contains([' ', '\'', '"', '$', '\\']) {
            line.push_str(&format!("{arg:?}"));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

/// Runs a Slurm command to completion (at most [`COMMAND_TIMEOUT`]) and returns its
/// standard output; a failure says what ran and its standard error.
fn slurm(mut command: Command) -> Result<String, SlurmError> {
    slurm_output(&mut command).and_then(|(ok, out, err)| {
        if ok {
            Ok(out)
        } else {
            Err(SlurmError::Command {
                command: command_line(&command),
                why: err,
            })
        }
    })
}

/// Runs `command` with a deadline: (success, stdout, "exit status N: stderr").
fn slurm_output(command: &mut Command) -> Result<(bool, String, String), SlurmError> {
    let line = command_line(command);
    let failed = |why: String| SlurmError::Command {
        command: line.clone(),
        why,
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start it: {e}")))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(out)) => {
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let why = match out.status.code() {
                Some(c) => format!("exit status {c}: {stderr}"),
                None => format!("{}: {stderr}", out.status),
            };
            Ok((out.status.success(), stdout, why))
        }
        Ok(Err(e)) => Err(failed(format!("waiting for it: {e}"))),
        Err(_) => {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            Err(failed(format!(
                "no answer within {}s",
                COMMAND_TIMEOUT.as_secs()
            )))
        }
    }
}

/// Options of a Slurm run.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--slurm-opt`: passed to `sbatch` / `srun` after gpuproc's own options.
    pub opts: Vec<String>,
    /// `--max-running`: the array throttle `%K`, or the most steps at once.
    pub max_running: Option<usize>,
}

/// Everything a Slurm run needs from the front end.
#[derive(Debug)]
pub struct Setup<'a> {
    /// The jobs.
    pub jobs: &'a [Job],
    /// Jobs done before (`--resume`).
    pub skip: &'a [bool],
    /// GPUs each job needs.
    pub needs: Vec<usize>,
    /// Retries each job may have.
    pub retries: Vec<u32>,
    /// Whether any job needs GPUs (the summary's GPU columns).
    pub gpu_mode: bool,
    /// Default timeout per attempt, seconds.
    pub timeout: Option<f64>,
    /// `--kill-after`, seconds.
    pub kill_after: f64,
    /// `--logs`.
    pub logs: Option<PathBuf>,
    /// The job log, open for appending.
    pub joblog: Option<JobLog>,
    /// How to report progress.
    pub progress: Progress,
    /// Slurm's options.
    pub options: SlurmOptions,
}

/// Runs the jobs through Slurm: job steps inside an allocation, job arrays outside one.
///
/// # Errors
/// A Slurm command that fails (the command and its standard error), a state directory or
/// job log that cannot be written. Submitted work is cancelled before the error returns.
pub fn run(setup: Setup<'_>) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("finding gpuproc's own path for the wrapper")?;
    let logs = match &setup.logs {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .with_context(|| format!("log directory {}", dir.display()))?,
        ),
        None => None,
    };
    // Absolute: the wrappers find it from wherever Slurm starts them.
    let base = match &logs {
        Some(dir) => dir.join(".slurm"),
        None => std::env::current_dir()
            .context("the current directory")?
            .join(".gpuproc-slurm"),
    };
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let state = base.join(format!("{stamp}-{}", std::process::id()));
    sys::private_dir(&base, policy::state_base_refusal)
        .with_context(|| format!("the Slurm state directory {}", base.display()))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&state)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    let setup_logs_given = logs.is_some();
    let in_allocation = std::env::var_os("SLURM_JOB_ID").is_some_and(|v| !v.is_empty());
    let mut runner = Runner {
        tracker: Tracker::new(setup.jobs, setup.skip, setup.joblog, setup.progress),
        jobs: setup.jobs,
        needs: setup.needs,
        timeout: setup.timeout,
        kill_after: setup.kill_after,
        logs,
        state: state.clone(),
        exe,
        options: setup.options,
        batches: 0,
    };
    let report = if in_allocation {
        runner.steps(setup.skip, setup.retries)
    } else {
        runner.arrays(setup.skip, setup.retries)
    }?;
    let failed = report.outcomes.iter().any(|o| !o.succeeded());
    if failed || report.interrupted {
        runner.tracker.note(&format!(
            "Slurm's own messages for the tasks are in {}",
            state.display()
        ));
    } else if !setup_logs_given {
        // With --logs the records (node, GPU UUIDs, times, peak memory) stay with the logs.
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_dir(&base);
    }
    Ok(report)
}

/// How an attempt ended, from its record or from Slurm.
struct Ended {
    exit: Exit,
    timed_out: bool,
    start: f64,
    runtime: f64,
    node: Option<String>,
    gpus: Vec<u32>,
    /// The GPUs for the job log: NVML indices on the node, else `CUDA_VISIBLE_DEVICES`.
    gpu_label: String,
    peak_memory: Option<u64>,
    /// The wrapper's GPU accounting (`None`: no record, or a record without one).
    gpu: Option<gpuproc::gpu::GpuAccounting>,
}

impl Ended {
    fn from_record(rec: &Record) -> Ended {
        let gpu_label = if rec.gpus.is_empty() {
            rec.cuda_visible_devices.clone().unwrap_or_default()
        } else {
            rec.gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        Ended {
            exit: if rec.signal != 0 {
                Exit::Signal(rec.signal)
            } else {
                Exit::Code(rec.exit)
            },
            timed_out: rec.timed_out,
            start: rec.start,
            runtime: rec.runtime,
            node: Some(rec.node.clone()),
            gpus: rec.gpus.clone(),
            gpu_label,
            peak_memory: rec.peak_memory,
            gpu: rec.gpu.clone(),
        }
    }

    /// An attempt that ended without a record (cancelled, killed, never started).
    fn lost(exit: Exit, node: Option<String>) -> Ended {
        Ended {
            exit,
            timed_out: false,
            start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            runtime: 0.0,
            node,
            gpus: Vec::new(),
            gpu_label: String::new(),
            peak_memory: None,
            gpu: None,
        }
    }

    fn failed(&self) -> bool {
        self.exit != Exit::Code(0) || self.timed_out
    }
}

/// Outcomes, the job log and progress: what both modes report the same way.
struct Tracker<'a> {
    jobs: &'a [Job],
    outcomes: Vec<Outcome>,
    joblog: Option<JobLog>,
    progress: Progress,
    bar: Option<ProgressBar>,
    done: usize,
    total: usize,
}

impl<'a> Tracker<'a> {
    fn new(jobs: &'a [Job], skip: &[bool], joblog: Option<JobLog>, progress: Progress) -> Self {
        let outcomes = Outcome::initial(jobs, skip);
        let total = outcomes.iter().filter(|o| !o.skipped).count();
        let bar = progress_bar(progress, total);
        Tracker {
            jobs,
            outcomes,
            joblog,
            progress,
            bar,
            done: 0,
            total,
        }
    }

    fn note(&self, message: &str) {
        match (&self.bar, self.progress) {
            (Some(bar), _) => bar.println(format!("gpuproc: {message}")),
            (None, Progress::Quiet) => {}
            (None, _) => eprintln!("gpuproc: {message}"),
        }
    }

    /// Records an attempt's end: a job-log line, the outcome, progress, and the job's
    /// output (`output`: its files, printed here when there is no `--logs`).
    fn finish(
        &mut self,
        launch: &Launch,
        command: &str,
        ended: &Ended,
        verdict: Verdict,
        output: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<()> {
        let job = &self.jobs[launch.job];
        if let Some((out, err)) = output {
            let copy = |path: &Path, to: &mut dyn Write| {
                if let Ok(bytes) = std::fs::read(path) {
                    let _ = to.write_all(&bytes);
                    let _ = to.flush();
                }
            };
            let print = || {
                copy(&out, &mut io::stdout().lock());
                copy(&err, &mut io::stderr().lock());
            };
            match &self.bar {
                Some(bar) => bar.suspend(print),
                None => print(),
            }
        }
        if let Some(log) = &mut self.joblog {
            let (code, signal) = match ended.exit {
                Exit::Code(c) => (c, 0),
                Exit::Signal(s) => (-1, s),
            };
            let host = match &ended.node {
                Some(node) if ended.gpu_label.is_empty() => node.clone(),
                Some(node) => format!("{node}/{}", ended.gpu_label),
                None => "?".to_owned(),
            };
            let entry = Entry {
                seq: job.seq,
                host: Some(host),
                start: ended.start,
                runtime: ended.runtime,
                exit: code,
                signal,
                command: command.to_owned(),
                gpu: ended.gpu.clone(),
            };
            log.write(&entry)?;
        }
        let outcome = &mut self.outcomes[launch.job];
        outcome.command = command.to_owned();
        outcome.attempts = launch.attempt;
        outcome.exit = Some(ended.exit);
        outcome.timed_out = ended.timed_out;
        outcome.runtime = crate::units::seconds(ended.runtime);
        outcome.gpus = ended.gpus.clone();
        outcome.node = ended.node.clone();
        outcome.gpu = ended.gpu.clone();
        if let Some(peak) = ended.peak_memory {
            outcome.peak_memory = Some(outcome.peak_memory.unwrap_or(0).max(peak));
        }
        let how = describe(ended.exit, ended.timed_out);
        let on = ended
            .node
            .as_ref()
            .map_or(String::new(), |n| format!(" on {n}"));
        let seq = job.seq;
        match verdict {
            Verdict::Retry => {
                let retries = job.retries.unwrap_or(0);
                self.note(&format!(
                    "job {seq} {how}{on}; retrying (retry {} of {retries})",
                    launch.attempt
                ));
            }
            Verdict::Done => {
                self.done += 1;
                let failed = ended.failed();
                match (&self.bar, self.progress) {
                    (Some(bar), _) => {
                        bar.inc(1);
                        if failed {
                            bar.println(format!("gpuproc: job {seq} {how}{on}"));
                        }
                    }
                    (None, Progress::Lines) => eprintln!(
                        "gpuproc: [{}/{}] job {seq} {how}{on} in {:.2}s",
                        self.done, self.total, ended.runtime
                    ),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn report(&mut self, interrupted: bool) -> Report {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        Report {
            outcomes: std::mem::take(&mut self.outcomes),
            interrupted,
            starved: None,
        }
    }
}

/// A task of a submitted array.
struct Task {
    launch: Launch,
    command: String,
    /// Slurm listed it as ended, without a record yet, since then.
    ended_since: Option<Instant>,
    done: bool,
}

/// A submitted array.
struct Array {
    id: u64,
    batch: PathBuf,
    tasks: Vec<Task>,
}

struct Runner<'a> {
    tracker: Tracker<'a>,
    jobs: &'a [Job],
    needs: Vec<usize>,
    timeout: Option<f64>,
    kill_after: f64,
    logs: Option<PathBuf>,
    state: PathBuf,
    exe: PathBuf,
    options: SlurmOptions,
    batches: usize,
}

impl Runner<'_> {
    /// Writes the batch file for `launches` and returns its path and the commands.
    fn write_batch(&mut self, launches: &[Launch]) -> anyhow::Result<(PathBuf, Vec<String>)> {
        let (path, bytes, commands) = self.batch(launches)?;
        record::write_atomic(&path, &bytes, false)
            .with_context(|| format!("writing batch file {}", path.display()))?;
        Ok((path, commands))
    }

    /// The batch for `launches`: the path of its file (not written), its contents and the
    /// commands.
    fn batch(&mut self, launches: &[Launch]) -> anyhow::Result<(PathBuf, Vec<u8>, Vec<String>)> {
        let path = record::batch_path(&self.state, self.batches);
        self.batches += 1;
        let tasks: Vec<TaskSpec> = launches
            .iter()
            .map(|l| {
                let job = &self.jobs[l.job];
                TaskSpec {
                    seq: job.seq,
                    attempt: l.attempt,
                    slot: l.slot,
                    command: job.command_for_slot(l.slot),
                    env: job.env.clone(),
                    timeout: job.timeout.or(self.timeout),
                }
            })
            .collect();
        let commands = tasks.iter().map(|t| t.command.clone()).collect();
        let batch = BatchFile {
            kill_after: self.kill_after,
            logs: self.logs.clone(),
            tasks,
        };
        let bytes = serde_json::to_vec(&batch).context("encoding a batch file")?;
        Ok((path, bytes, commands))
    }

    /// The job's output files, for the runner to print, when there is no `--logs`.
    fn output_of(&self, batch: &Path, task: usize) -> Option<(PathBuf, PathBuf)> {
        self.logs.is_none().then(|| {
            (
                record::task_file(batch, task, "out"),
                record::task_file(batch, task, "err"),
            )
        })
    }

    /// A job step's output files, those of its job slot, when there is no `--logs`.
    fn step_output(&self, slot: usize) -> Option<(PathBuf, PathBuf)> {
        self.logs.is_none().then(|| {
            (
                record::slot_file(&self.state, slot, "out"),
                record::slot_file(&self.state, slot, "err"),
            )
        })
    }

    /// The wrapper's command line for a batch (and task, for a step).
    fn wrapper(&self, batch: &Path, task: Option<usize>) -> Vec<String> {
        let mut argv = vec![
            self.exe.to_string_lossy().into_owned(),
            "__slurm-job".to_owned(),
            batch.to_string_lossy().into_owned(),
        ];
        if let Some(task) = task {
            argv.push(task.to_string());
        }
        argv
    }

    /// Job-array mode.
    fn arrays(&mut self, skip: &[bool], retries: Vec<u32>) -> anyhow::Result<Report> {
        let mut config = Command::new("scontrol");
        config.args(["show", "config"]);
        let max_array = policy::parse_max_array_size(&slurm(config)?).map_err(SlurmError::from)?;
        if max_array == 0 {
            bail!("this Slurm cluster has job arrays disabled (MaxArraySize = 0)");
        }
        let n = self.jobs.len();
        let mut scheduler = Scheduler::new(vec![0; n], retries, skip, 0, 1, n.max(1));
        let mut signals = Signals::install().context("installing signal handlers")?;
        let mut arrays: Vec<Array> = Vec::new();
        let mut queue: Vec<Launch> = Vec::new();
        let (mut pending, mut running) = (0usize, 0usize);
        let mut interval = policy::POLL_MIN;
        let mut submitted = Instant::now();
        let mut poll_at = submitted;
        // Records taken since the last poll: progress for the poll's back-off.
        let mut took = false;
        let mut stopping: Option<Instant> = None;
        // Since when every job is done while `squeue` still lists some of their tasks.
        let mut lingering_since: Option<Instant> = None;
        // Without inotify (or past its limits), squeue polls alone find the ends.
        let mut watch = sys::DirWatch::new(&self.state).ok();
        let result = (|| -> anyhow::Result<bool> {
            loop {
                if stopping.is_none() {
                    while let Some(launch) = scheduler.next() {
                        queue.push(launch);
                    }
                    if !queue.is_empty() {
                        if let Some(throttle) =
                            policy::may_submit(pending, running, self.options.max_running)
                        {
                            let pairs: Vec<(usize, usize)> = queue
                                .iter()
                                .enumerate()
                                .map(|(i, l)| (i, self.needs[l.job]))
                                .collect();
                            let mut batches = policy::plan_batches(&pairs, max_array);
                            if throttle.is_some() {
                                batches.truncate(1);
                            }
                            let mut taken = vec![false; queue.len()];
                            for batch in &batches {
                                let launches: Vec<Launch> =
                                    batch.jobs.iter().map(|&i| queue[i].clone()).collect();
                                let array = self.submit(batch, &launches, throttle)?;
                                submitted = Instant::now();
                                poll_at = gpuproc::time::saturating_add(submitted, interval);
                                pending += array.tasks.len();
                                arrays.push(array);
                                for &i in &batch.jobs {
                                    taken[i] = true;
                                }
                            }
                            let mut i = 0;
                            queue.retain(|_| {
                                i += 1;
                                !taken[i - 1]
                            });
                        }
                    }
                }
                if arrays.is_empty() && (stopping.is_some() || queue.is_empty()) {
                    return Ok(stopping.is_some());
                }
                // Until the next poll, unless a signal asks for something or records
                // arrive. Slurm commands' own SIGCHLDs wake the wait too: they do not bring
                // the poll forward.
                let (received, recorded) = loop {
                    let left = poll_at.saturating_duration_since(Instant::now());
                    let (received, watched) = signals
                        .wait_or_watch(Some(left), watch.as_ref())
                        .context("waiting for Slurm")?;
                    let mut recorded = false;
                    if watched {
                        match watch.as_mut().map(sys::DirWatch::drain) {
                            Some(Ok(renamed)) => {
                                recorded = self.take_records(
                                    &mut arrays,
                                    &mut scheduler,
                                    &renamed,
                                    stopping.is_some(),
                                )?;
                            }
                            Some(Err(_)) => watch = None,
                            None => {}
                        }
                    }
                    took |= recorded;
                    if received.interrupt
                        || received.terminate
                        || recorded
                        || Instant::now() >= poll_at
                    {
                        break (received, recorded);
                    }
                };
                let interrupted = received.interrupt || received.terminate;
                if recorded && !interrupted && Instant::now() < poll_at {
                    if arrays.iter().all(|a| a.tasks.iter().all(|t| t.done)) {
                        // Every job has ended: soon ask whether Slurm has let them go.
                        poll_at = poll_at.min(gpuproc::time::saturating_add(
                            Instant::now(),
                            policy::POLL_LINGER,
                        ));
                    }
                    // Submit what the records freed (retries, the throttle), or wait.
                    continue;
                }
                if received.interrupt || received.terminate {
                    if stopping.is_some() {
                        self.tracker
                            .note("interrupted again: leaving without waiting for Slurm");
                        return Ok(true);
                    }
                    stopping = Some(Instant::now());
                    scheduler.clear();
                    queue.clear();
                    let ids: Vec<String> = arrays.iter().map(|a| a.id.to_string()).collect();
                    self.tracker.note(&format!(
                        "interrupted: cancelling job array{} {} (scancel); Ctrl-C again \
                         leaves without waiting",
                        if ids.len() == 1 { "" } else { "s" },
                        ids.join(" ")
                    ));
                    scancel(&ids)?;
                    interval = policy::POLL_MIN;
                }
                let (progressed, counts) = self.poll(&mut arrays, &mut scheduler, stopping)?;
                (pending, running) = counts;
                interval = policy::next_poll(interval, progressed || took, submitted.elapsed());
                took = false;
                poll_at = gpuproc::time::saturating_add(Instant::now(), interval);
                let all_done = arrays.iter().all(|a| a.tasks.iter().all(|t| t.done));
                if stopping.is_none() && all_done && !arrays.is_empty() {
                    let since = *lingering_since.get_or_insert_with(Instant::now);
                    if let Some(quick) = policy::linger_poll(since.elapsed()) {
                        interval = quick;
                        poll_at = gpuproc::time::saturating_add(Instant::now(), interval);
                    }
                    if since.elapsed() >= CANCEL_WAIT {
                        self.tracker.note(&format!(
                            "every job has ended, yet squeue still lists tasks of job array \
                             {} after {}s; leaving them",
                            arrays
                                .iter()
                                .map(|a| a.id.to_string())
                                .collect::<Vec<_>>()
                                .join(" "),
                            CANCEL_WAIT.as_secs()
                        ));
                        return Ok(false);
                    }
                } else {
                    lingering_since = None;
                }
                if stopping.is_some_and(|s| s.elapsed() >= CANCEL_WAIT) {
                    self.tracker.note(&format!(
                        "cancelled tasks still listed by squeue after {}s; leaving them",
                        CANCEL_WAIT.as_secs()
                    ));
                    return Ok(true);
                }
            }
        })();
        match result {
            Ok(interrupted) => Ok(self.tracker.report(interrupted)),
            Err(e) => {
                // No array outlives a runner that gives up.
                let ids: Vec<String> = arrays.iter().map(|a| a.id.to_string()).collect();
                if !ids.is_empty() {
                    let _ = scancel(&ids);
                }
                Err(e)
            }
        }
    }

    /// Submits `launches` as one array of `batch.gpus`-GPU tasks.
    fn submit(
        &mut self,
        batch: &Batch,
        launches: &[Launch],
        throttle: Option<usize>,
    ) -> anyhow::Result<Array> {
        let (path, commands) = self.write_batch(launches)?;
        let Some(spec) = policy::array_spec(launches.len(), throttle) else {
            bail!("an empty job array");
        };
        let mut sbatch = Command::new("sbatch");
        sbatch
            .arg("--parsable")
            .arg(format!("--array={spec}"))
            .arg("--job-name=gpuproc")
            .arg("--ntasks=1")
            .arg(format!(
                "--output={}",
                path.with_file_name(format!(
                    "{}.%a.slurm",
                    path.file_stem().unwrap_or_default().to_string_lossy()
                ))
                .display()
            ));
        if batch.gpus > 0 {
            sbatch.arg(format!("--gres=gpu:{}", batch.gpus));
        }
        if let Some(p) = &self.options.partition {
            sbatch.arg(format!("--partition={p}"));
        }
        sbatch.args(&self.options.opts);
        let wrap = self
            .wrapper(&path, None)
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        sbatch.arg("--wrap").arg(format!("exec {wrap}"));
        let id = policy::parse_sbatch(&slurm(sbatch)?).map_err(SlurmError::from)?;
        let tasks = launches
            .iter()
            .zip(commands)
            .map(|(l, command)| Task {
                launch: l.clone(),
                command,
                ended_since: None,
                done: false,
            })
            .collect();
        Ok(Array {
            id,
            batch: path,
            tasks,
        })
    }

    /// One `squeue` for every array; records what ended. Returns whether anything started
    /// or ended, and the tasks now pending and running.
    fn poll(
        &mut self,
        arrays: &mut Vec<Array>,
        scheduler: &mut Scheduler,
        stopping: Option<Instant>,
    ) -> anyhow::Result<(bool, (usize, usize))> {
        if arrays.is_empty() {
            return Ok((false, (0, 0)));
        }
        let ids: Vec<String> = arrays.iter().map(|a| a.id.to_string()).collect();
        let mut squeue = Command::new("squeue");
        squeue
            .args(["-h", "-r", "-t", policy::SQUEUE_STATES])
            .args(["-o", policy::SQUEUE_FORMAT, "-j"])
            .arg(ids.join(","));
        let line = command_line(&squeue);
        let (ok, out, why) = slurm_output(&mut squeue)?;
        let listed = if ok {
            policy::parse_squeue(&out).map_err(SlurmError::from)?
        } else if policy::squeue_forgot(&why) {
            HashMap::new()
        } else {
            return Err(SlurmError::Command { command: line, why }.into());
        };
        let mut progressed = false;
        let (mut pending, mut running) = (0, 0);
        let now = Instant::now();
        // Arrays whose tasks are all done but which Slurm still runs (a wrapper exiting
        // after its record, `COMPLETING`): kept, so that the run ends when Slurm is done.
        let mut lingering: Vec<u64> = Vec::new();
        for array in arrays.iter_mut() {
            for t in 0..array.tasks.len() {
                if array.tasks[t].done {
                    let state = listed.get(&(array.id, t)).map(|q| q.state);
                    if matches!(state, Some(TaskState::Pending | TaskState::Running)) {
                        lingering.push(array.id);
                    }
                    continue;
                }
                let queued = listed.get(&(array.id, t));
                let state = queued.map_or(TaskState::Ended, |q| q.state);
                match state {
                    TaskState::Pending => {
                        pending += 1;
                        continue;
                    }
                    TaskState::Running => {
                        running += 1;
                        continue;
                    }
                    TaskState::Ended | TaskState::Lost => {}
                }
                let batch = array.batch.clone();
                let rec = record::read_record(&record::task_file(&batch, t, "rec.json"))?;
                let task = &mut array.tasks[t];
                let node = queued.map(|q| q.node.clone()).filter(|n| !n.is_empty());
                let state_name = queued.map_or("gone from the queue", |q| q.state_name.as_str());
                let ended = match rec {
                    Some(rec) if !(state == TaskState::Lost && rec.exit != 0) => {
                        Ended::from_record(&rec)
                    }
                    _ if state == TaskState::Lost && stopping.is_none() => {
                        // Preempted, or its node failed: again, without counting a failure.
                        task.done = true;
                        progressed = true;
                        scheduler.requeue(&task.launch);
                        let seq = self.jobs[task.launch.job].seq;
                        self.tracker.note(&format!(
                            "job {seq}: {state_name}{}; submitting it again",
                            node.as_ref().map_or(String::new(), |n| format!(" on {n}"))
                        ));
                        continue;
                    }
                    _ => {
                        let since = *task.ended_since.get_or_insert(now);
                        if stopping.is_some() {
                            // Cancelled before it ran (or before its wrapper could say).
                            task.done = true;
                            progressed = true;
                            continue;
                        }
                        if now.duration_since(since) < RECORD_GRACE {
                            continue;
                        }
                        let seq = self.jobs[task.launch.job].seq;
                        self.tracker.note(&format!(
                            "job {seq}: Slurm task {}_{t} ended ({state_name}) without a \
                             record from its wrapper; Slurm's messages: {}",
                            array.id,
                            record::task_file(&batch, t, "slurm").display()
                        ));
                        Ended::lost(Exit::Signal(9), node)
                    }
                };
                progressed = true;
                self.finish_task(array, t, &ended, scheduler, stopping.is_some())?;
            }
        }
        arrays.retain(|a| a.tasks.iter().any(|t| !t.done) || lingering.contains(&a.id));
        Ok((progressed, (pending, running)))
    }

    /// Task `t` of `array` ended as `ended`: the scheduler, job log and progress hear it.
    fn finish_task(
        &mut self,
        array: &mut Array,
        t: usize,
        ended: &Ended,
        scheduler: &mut Scheduler,
        stopping: bool,
    ) -> anyhow::Result<()> {
        let task = &mut array.tasks[t];
        task.done = true;
        let verdict = scheduler.finish(&task.launch, ended.failed(), stopping);
        let launch = task.launch.clone();
        let command = task.command.clone();
        let output = self.output_of(&array.batch, t);
        self.tracker
            .finish(&launch, &command, ended, verdict, output)
    }

    /// Finishes the tasks whose records were `renamed` into the state directory (all
    /// unfinished tasks' when the kernel's queue overflowed) and say they succeeded.
    /// Returns whether any was finished. Records that say a task failed, or that cannot
    /// be read, are left to the next poll, which knows what Slurm did with the task.
    fn take_records(
        &mut self,
        arrays: &mut [Array],
        scheduler: &mut Scheduler,
        renamed: &sys::Renamed,
        stopping: bool,
    ) -> anyhow::Result<bool> {
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        if renamed.overflowed {
            for (a, array) in arrays.iter().enumerate() {
                candidates.extend((0..array.tasks.len()).map(|t| (a, t)));
            }
        } else {
            for name in &renamed.names {
                let Some((stem, task)) = name.to_str().and_then(record::parse_record_name) else {
                    continue;
                };
                let found = arrays.iter().position(|array| {
                    array.batch.file_stem().and_then(|s| s.to_str()) == Some(stem)
                });
                if let Some(a) = found.filter(|&a| task < arrays[a].tasks.len()) {
                    candidates.push((a, task));
                }
            }
        }
        let mut took = false;
        for (a, t) in candidates {
            let array = &mut arrays[a];
            if array.tasks[t].done {
                continue;
            }
            let path = record::task_file(&array.batch, t, "rec.json");
            let Ok(Some(rec)) = record::read_record(&path) else {
                continue;
            };
            let ended = Ended::from_record(&rec);
            if ended.failed() {
                continue;
            }
            took = true;
            self.finish_task(array, t, &ended, scheduler, stopping)?;
        }
        // (The arrays stay until `squeue` no longer lists them: see `poll`.)
        Ok(took)
    }

    /// Job-step mode, inside an allocation.
    fn steps(&mut self, skip: &[bool], retries: Vec<u32>) -> anyhow::Result<Report> {
        let job_id = std::env::var("SLURM_JOB_ID").unwrap_or_default();
        let mut show = Command::new("scontrol");
        show.args(["-o", "show", "job", &job_id]);
        let alloc = policy::parse_allocation(&slurm(show)?).map_err(SlurmError::from)?;
        if let Some((i, &need)) = self
            .needs
            .iter()
            .enumerate()
            .find(|(i, &n)| n > alloc.gpus && !skip.get(*i).copied().unwrap_or(false))
        {
            bail!(
                "job {} needs {need} GPUs, but allocation {job_id} has {}",
                self.jobs[i].seq,
                alloc.gpus
            );
        }
        if self.options.partition.is_some() {
            self.tracker
                .note("--partition is ignored inside an allocation: steps run in it");
        }
        let slots = policy::step_slots(&alloc, self.options.max_running);
        let mut scheduler = Scheduler::new(self.needs.clone(), retries, skip, alloc.gpus, 1, slots);
        let mut signals = Signals::install().context("installing signal handlers")?;
        // srun's pid to its launch, batch file and command.
        let mut running: HashMap<u32, (Launch, PathBuf, String)> = HashMap::new();
        let mut stopping = false;
        let mut interrupts = 0;
        let result = (|| -> anyhow::Result<bool> {
            loop {
                if !stopping {
                    while let Some(launch) = scheduler.next() {
                        let (pid, batch, command) = self.start_step(&launch, alloc.gpus > 0)?;
                        running.insert(pid, (launch, batch, command));
                    }
                }
                if running.is_empty() && (stopping || scheduler.queued() == 0) {
                    return Ok(stopping);
                }
                let received = signals.wait(None).context("waiting for job steps")?;
                if received.interrupt || received.terminate {
                    interrupts += 1;
                    stopping = true;
                    scheduler.clear();
                    // Through Slurm, by step id (the wrapper writes it when it starts):
                    // srun answers SIGTERM by killing its step outright, but `scancel
                    // --signal=TERM` lets the wrapper stop the job and record how it ended.
                    let mut steps = Vec::new();
                    let mut unknown = Vec::new();
                    for (&pid, (launch, _, _)) in &running {
                        let step = record::slot_file(&self.state, launch.slot, "step");
                        match std::fs::read_to_string(step) {
                            Ok(id) if !id.trim().is_empty() => steps.push(id.trim().to_owned()),
                            _ => unknown.push(pid),
                        }
                    }
                    if interrupts == 1 {
                        self.tracker.note(&format!(
                            "interrupted: starting no more jobs; stopping {} running steps; \
                             Ctrl-C again kills them",
                            running.len()
                        ));
                        let mut scancel = Command::new("scancel");
                        scancel.arg("--signal=TERM").args(&steps);
                        if !steps.is_empty() {
                            if let Err(e) = slurm(scancel) {
                                self.tracker.note(&e.to_string());
                            }
                        }
                        // Not started yet: srun cancels the step.
                        for &pid in &unknown {
                            sys::signal_group(pid, Sig::Term);
                        }
                    } else {
                        if let Err(e) = scancel(&steps) {
                            self.tracker.note(&e.to_string());
                        }
                        for &pid in running.keys() {
                            sys::signal_group(pid, Sig::Kill);
                        }
                    }
                }
                while let Some((pid, exit)) = sys::reap_any().context("reaping srun")? {
                    let Some((launch, batch, command)) = running.remove(&pid) else {
                        continue;
                    };
                    let rec = record::read_record(&record::task_file(&batch, 0, "rec.json"))?;
                    let ended = match rec {
                        Some(rec) => Ended::from_record(&rec),
                        None if stopping => {
                            // Stopped before its wrapper ran it: not run.
                            scheduler.finish(&launch, true, true);
                            continue;
                        }
                        None => {
                            let log = record::slot_file(&self.state, launch.slot, "slurm");
                            let text = std::fs::read_to_string(&log).unwrap_or_default();
                            let tail: Vec<&str> = text.lines().rev().take(3).collect();
                            let tail: Vec<&str> = tail.into_iter().rev().collect();
                            {
                                self.tracker.note(&format!(
                                    "job {}: srun {} without running it: {}",
                                    self.jobs[launch.job].seq,
                                    describe(exit, false),
                                    if tail.is_empty() {
                                        "no message".to_owned()
                                    } else {
                                        tail.join(" | ")
                                    }
                                ));
                            }
                            Ended::lost(exit, None)
                        }
                    };
                    let verdict = scheduler.finish(&launch, ended.failed(), stopping);
                    let output = self.step_output(launch.slot);
                    self.tracker
                        .finish(&launch, &command, &ended, verdict, output)?;
                }
            }
        })();
        if !running.is_empty() {
            for &pid in running.keys() {
                sys::signal_group(pid, Sig::Kill);
            }
            let end = gpuproc::time::deadline(Duration::from_secs(5));
            while !running.is_empty() && gpuproc::time::remaining(end) != Some(Duration::ZERO) {
                match sys::reap_any() {
                    Ok(Some((pid, _))) => {
                        running.remove(&pid);
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break,
                }
            }
        }
        let interrupted = result?;
        Ok(self.tracker.report(interrupted))
    }

    /// Starts `launch` as `srun --exact` in a process group of its own: its pid, batch
    /// file and command.
    fn start_step(
        &mut self,
        launch: &Launch,
        allocation_has_gpus: bool,
    ) -> anyhow::Result<(u32, PathBuf, String)> {
        use std::os::unix::process::CommandExt;
        // The task goes on the wrapper's command line, not in a file of its own (the batch
        // path only names its record), unless it is too long for one argument.
        let (path, bytes, commands) = self.batch(std::slice::from_ref(launch))?;
        let inline = match String::from_utf8(bytes) {
            Ok(text) if text.len() <= INLINE_MAX => Some(text),
            Ok(text) => {
                record::write_atomic(&path, text.as_bytes(), false)
                    .with_context(|| format!("writing batch file {}", path.display()))?;
                None
            }
            Err(_) => bail!("a batch file is not UTF-8"),
        };
        // The slot's files, truncated: no step id until its wrapper writes one.
        let step = record::slot_file(&self.state, launch.slot, "step");
        File::create(&step).with_context(|| format!("creating {}", step.display()))?;
        let log = record::slot_file(&self.state, launch.slot, "slurm");
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut srun = Command::new("srun");
        srun.args([
            "--exact",
            "-N1",
            "-n1",
            "--cpus-per-task=1",
            "--job-name=gpuproc",
        ]);
        let need = self.needs[launch.job];
        if need > 0 {
            srun.arg(format!("--gres=gpu:{need}"));
        } else if allocation_has_gpus {
            srun.arg("--gres=none");
        }
        srun.args(&self.options.opts)
            .args(self.wrapper(&path, Some(0)))
            .args(
                inline
                    .map(|text| ["--inline".to_owned(), text])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log_file
                    .try_clone()
                    .with_context(|| format!("opening {}", log.display()))?,
            ))
            .stderr(Stdio::from(log_file))
            .process_group(0);
        let child = srun.spawn().map_err(|e| SlurmError::Command {
            command: command_line(&srun),
            why: format!("cannot start it: {e}"),
        })?;
        let command = commands.into_iter().next().unwrap_or_default();
        Ok((child.id(), path, command))
    }
}

/// `scancel IDS`.
fn scancel(ids: &[String]) -> Result<(), SlurmError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut scancel = Command::new("scancel");
    scancel.args(ids);
    slurm(scancel).map(|_| ())
}

/// `arg` quoted for `sh`.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_command_lines() {
        assert_eq!(shell_quote("/usr/bin/gpuproc"), "/usr/bin/gpuproc");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        let mut c = Command::new("sbatch");
        c.args(["--parsable", "--wrap", "exec x y"]);
        assert_eq!(command_line(&c), "sbatch --parsable --wrap \"exec x y\"");
    }

    #[test]
    fn a_failing_command_says_what_ran_and_why() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo nope >&2; exit 4"]);
        let err = slurm(c).unwrap_err().to_string();
        assert!(
            err.contains("`sh -c") && err.contains("exit status 4: nope"),
            "{err}"
        );
        let err = slurm(Command::new("/nonexistent/sbatch"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/sbatch") && err.contains("cannot start"),
            "{err}"
        );
    }
}
