//! Slurm policy, pure: which jobs go into which array submission, the `--array` spec, the
//! polling backoff, and strict parsers for what `sbatch`, `squeue` and `scontrol` print.
//! No processes or clocks here; [`super`] drives them. Malformed output is an error that
//! quotes what was read, never a panic.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// Output a Slurm command printed that is not what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// What was being read (`squeue`, `sbatch --parsable`, ...).
    pub what: &'static str,
    /// Why it does not parse.
    pub why: String,
    /// The offending text (one line, or the start of the output).
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unexpected {} output ({}): {:?}",
            self.what, self.why, self.text
        )
    }
}

impl std::error::Error for ParseError {}

fn error(what: &'static str, why: impl Into<String>, text: &str) -> ParseError {
    let text: String = text.chars().take(200).collect();
    ParseError {
        what,
        why: why.into(),
        text,
    }
}

/// One array submission: the jobs (indices into the job list) that become its tasks
/// `0..jobs.len()`, all needing `gpus` GPUs each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// GPUs each task gets (`--gres=gpu:N`; 0: none asked for).
    pub gpus: usize,
    /// Task `i` runs job `jobs[i]`.
    pub jobs: Vec<usize>,
}

/// Splits the jobs waiting to be submitted (`(job, gpus)`, in queue order) into array
/// submissions: one per run of jobs with the same GPU count (a job array has one resource
/// request), each at most `max_array_size` tasks (Slurm's `MaxArraySize`: task ids must be
/// below it). Order is kept, so earlier jobs start first. `max_array_size` 0 is taken as 1.
pub fn plan_batches(pending: &[(usize, usize)], max_array_size: usize) -> Vec<Batch> {
    let max = max_array_size.max(1);
    let mut by_gpus: Vec<Batch> = Vec::new();
    let mut index: HashMap<usize, usize> = HashMap::new();
    for &(job, gpus) in pending {
        let at = *index.entry(gpus).or_insert_with(|| {
            by_gpus.push(Batch {
                gpus,
                jobs: Vec::new(),
            });
            by_gpus.len() - 1
        });
        by_gpus[at].jobs.push(job);
    }
    let mut batches = Vec::new();
    for group in by_gpus {
        for chunk in group.jobs.chunks(max) {
            batches.push(Batch {
                gpus: group.gpus,
                jobs: chunk.to_vec(),
            });
        }
    }
    batches
}

/// The `--array` value for `tasks` tasks (`0-N`), throttled to `throttle` running at once
/// (`%K`) when given. `None` for zero tasks.
pub fn array_spec(tasks: usize, throttle: Option<usize>) -> Option<String> {
    let last = tasks.checked_sub(1)?;
    let range = if last == 0 {
        "0".to_owned()
    } else {
        format!("0-{last}")
    };
    Some(match throttle {
        Some(k) => format!("{range}%{}", k.max(1)),
        None => range,
    })
}

/// Whether another array may be submitted now, and with what throttle: never while an
/// earlier array still has pending tasks (they would compete, and the earlier jobs should
/// start first); with a throttle `K`, only while fewer than `K` tasks run, and the new
/// array gets the room left (`K - running`), so the run never has more than `K` running.
/// `Some(None)`: submit without a throttle; `None`: not now.
pub fn may_submit(
    pending: usize,
    running: usize,
    throttle: Option<usize>,
) -> Option<Option<usize>> {
    if pending > 0 {
        return None;
    }
    match throttle {
        None => Some(None),
        Some(k) if running < k => Some(Some(k - running)),
        Some(_) => None,
    }
}

/// The first interval between `squeue` polls.
pub const POLL_MIN: Duration = Duration::from_millis(250);
/// The longest interval between `squeue` polls.
pub const POLL_MAX: Duration = Duration::from_secs(5);

/// For this long after a submission polls stay at [`POLL_MIN`]: a short job's first result
/// is seen within a quarter of a second of its end (a few more queries per array), where
/// backing off from the start would see it a second late.
pub const POLL_FAST_AFTER_SUBMIT: Duration = Duration::from_secs(3);

/// The interval before the next poll: back to [`POLL_MIN`] when the last poll saw a task
/// start or end, or within [`POLL_FAST_AFTER_SUBMIT`] of the last submission
/// (`since_submit`), else half as long again as `current`, up to [`POLL_MAX`]. Queries on
/// real clusters are rate-limited; a quiet queue is asked less and less often.
pub fn next_poll(current: Duration, progressed: bool, since_submit: Duration) -> Duration {
    if progressed || since_submit < POLL_FAST_AFTER_SUBMIT {
        return POLL_MIN;
    }
    let grown = current.saturating_add(current / 2);
    grown.clamp(POLL_MIN, POLL_MAX)
}

/// The interval between polls once every job has ended while `squeue` still lists some of
/// their tasks (Slurm's own end of a task, `COMPLETING`), for the first
/// [`LINGER_FAST`] of it: the run ends within [`POLL_LINGER`] of Slurm letting the tasks
/// go, for a few more queries; after that, [`next_poll`]'s back-off.
pub const POLL_LINGER: Duration = Duration::from_millis(50);
/// See [`POLL_LINGER`].
pub const LINGER_FAST: Duration = Duration::from_secs(1);

/// The poll interval while every job has ended and Slurm still lists tasks of them, for
/// `since` now: [`POLL_LINGER`] at first, `None` (the usual back-off) after [`LINGER_FAST`].
pub fn linger_poll(since: Duration) -> Option<Duration> {
    (since < LINGER_FAST).then_some(POLL_LINGER)
}

/// The job id `sbatch --parsable` prints (`ID` or `ID;CLUSTER`).
///
/// # Errors
/// Anything else.
pub fn parse_sbatch(out: &str) -> Result<u64, ParseError> {
    let line = out.trim();
    let id = line.split(';').next().unwrap_or_default();
    id.parse::<u64>()
        .map_err(|_| error("sbatch --parsable", "expected a job id", line))
}

/// How Slurm sees an array task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to start (also held, requeued, suspended: it may still run).
    Pending,
    /// Running (or configuring its node, or completing).
    Running,
    /// Ended; its record says how.
    Ended,
    /// Ended without running to completion for reasons not its own (preempted, node
    /// failure, failed boot): run it again without counting a failure.
    Lost,
}

/// Classifies a `squeue %T` state name.
///
/// # Errors
/// A state name Slurm does not have.
pub fn task_state(name: &str) -> Result<TaskState, ParseError> {
    Ok(match name {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "SUSPENDED" | "STOPPED"
        | "RESV_DEL_HOLD" | "SPECIAL_EXIT" => TaskState::Pending,
        "RUNNING" | "CONFIGURING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" | "RESIZING" => {
            TaskState::Running
        }
        "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "OUT_OF_MEMORY" | "DEADLINE"
        | "REVOKED" => TaskState::Ended,
        "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" => TaskState::Lost,
        _ => return Err(error("squeue", "unknown job state", name)),
    })
}

/// One array task as `squeue` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedTask {
    /// `%T`, classified.
    pub state: TaskState,
    /// `%T` as printed.
    pub state_name: String,
    /// `%N`: where it runs or ran (empty while pending).
    pub node: String,
}

/// The `squeue -o` format [`parse_squeue`] reads: array job id, task id, state, nodes.
pub const SQUEUE_FORMAT: &str = "%F|%K|%T|%N";

/// The states the runner asks `squeue` about (`-t`): the pending and running ones, and the
/// ends it must tell apart ([`TaskState::Lost`]). Tasks that ended otherwise are left out
/// (their records say how they ended), which keeps each poll's answer to the tasks still
/// in play rather than every finished one Slurm remembers.
pub const SQUEUE_STATES: &str = "PENDING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,SUSPENDED,STOPPED,\
     RESV_DEL_HOLD,SPECIAL_EXIT,RUNNING,CONFIGURING,COMPLETING,SIGNALING,STAGE_OUT,RESIZING,\
     PREEMPTED,NODE_FAIL,BOOT_FAIL";

/// Parses `squeue -h -r -o` [`SQUEUE_FORMAT`] output: `(array job id, task id)` to the task.
/// Lines of jobs that are not array tasks (`%K` is `N/A`) are ignored.
///
/// # Errors
/// A line with other fields, or ids that are not numbers.
pub fn parse_squeue(out: &str) -> Result<HashMap<(u64, usize), QueuedTask>, ParseError> {
    let mut tasks = HashMap::new();
    for line in out.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        let [array, task, state, node] = fields[..] else {
            return Err(error("squeue", "expected ARRAY_JOB|TASK|STATE|NODES", line));
        };
        let task = task.trim();
        if task == "N/A" {
            continue;
        }
        let array: u64 = array
            .trim()
            .parse()
            .map_err(|_| error("squeue", "array job id is not a number", line))?;
        let task: usize = task
            .parse()
            .map_err(|_| error("squeue", "array task id is not a number", line))?;
        let state_name = state.trim();
        tasks.insert(
            (array, task),
            QueuedTask {
                state: task_state(state_name)?,
                state_name: state_name.to_owned(),
                node: node.trim().to_owned(),
            },
        );
    }
    Ok(tasks)
}

/// Whether `squeue`'s error means only that the jobs asked about are no longer known
/// (purged after `MinJobAge`): then they have all ended.
pub fn squeue_forgot(stderr: &str) -> bool {
    stderr.contains("Invalid job id specified")
}

/// `MaxArraySize` from `scontrol show config` (`MaxArraySize = 1001`).
///
/// # Errors
/// No such line, or not a number.
/// Why the directory holding a run's state directories (`.gpuproc-slurm`, or `.slurm` under
/// `--logs`) may not be used, from what `lstat` says of it; `None` when it may. The records
/// in it say how each job ended, so only its user may write there: it must be a directory
/// (not a link), owned by the runner's user, and not writable by group or others. In a
/// shared directory such as `/tmp`, another user who made it first gets a refusal, never
/// a say in the results.
pub fn state_base_refusal(is_dir: bool, uid: u32, mode: u32, my_uid: u32) -> Option<String> {
    if !is_dir {
        return Some("it is not a directory (a link or a file is refused)".into());
    }
    if uid != my_uid {
        return Some(format!(
            "it belongs to uid {uid}, not to this user (uid {my_uid}): its owner could change \
             the jobs' records"
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "its group or other users may write to it (mode {:04o}): run `chmod go-w` on it",
            mode & 0o7777
        ));
    }
    None
}

pub fn parse_max_array_size(config: &str) -> Result<usize, ParseError> {
    for line in config.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() == "MaxArraySize" {
            let value = value.trim();
            return value
                .parse::<usize>()
                .map_err(|_| error("scontrol show config", "MaxArraySize is not a number", line));
        }
    }
    Err(error(
        "scontrol show config",
        "no MaxArraySize line",
        config.lines().next().unwrap_or_default(),
    ))
}

/// What an allocation offers job steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Nodes.
    pub nodes: usize,
    /// CPUs over all nodes.
    pub cpus: usize,
    /// GPUs over all nodes.
    pub gpus: usize,
}

/// Reads an allocation from `scontrol -o show job ID` (one line of `Key=Value` fields):
/// `NumNodes`, `NumCPUs`, and the GPUs from `TRES=...gres/gpu=N` (the total) or else
/// `TresPerNode=gres:gpu[:TYPE]:N` (per node), `TresPerJob=gres:gpu[:TYPE]:N` (the total).
///
/// # Errors
/// No such fields, or counts that are not numbers.
pub fn parse_allocation(show_job: &str) -> Result<Allocation, ParseError> {
    const WHAT: &str = "scontrol -o show job";
    let line = show_job
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    let count = |name: &str| -> Result<usize, ParseError> {
        let value = field(name).ok_or_else(|| error(WHAT, format!("no {name}"), line))?;
        // NumNodes can be a range (`1-2`) while pending; allocated jobs have one number.
        value
            .parse()
            .map_err(|_| error(WHAT, format!("{name} is not a number"), line))
    };
    let nodes = count("NumNodes")?;
    let cpus = count("NumCPUs")?;
    let gres_count = |spec: &str| -> Result<Option<usize>, ParseError> {
        let mut total = None;
        for item in spec.split(',') {
            let item = item.trim();
            let Some(rest) = item
                .strip_prefix("gres:gpu")
                .or_else(|| item.strip_prefix("gres/gpu"))
            else {
                continue;
            };
            if !rest.starts_with([':', '=']) {
                continue;
            }
            // `gres:gpu:4`, `gres:gpu:a100:4`, `gres/gpu=4`, `gres/gpu:a100=4`.
            let n = rest.rsplit([':', '=']).next().unwrap_or_default();
            let n: usize = n
                .parse()
                .map_err(|_| error(WHAT, format!("GPU count in {item:?} is not a number"), line))?;
            // A typed entry repeats the untyped total (`gres/gpu=4,gres/gpu:a100=4`).
            if rest[1..].parse::<usize>().is_ok() {
                return Ok(Some(n));
            }
            total = Some(total.unwrap_or(0) + n);
        }
        Ok(total)
    };
    let gpus = if let Some(n) = field("TRES").map(gres_count).transpose()?.flatten() {
        n
    } else if let Some(n) = field("TresPerJob").map(gres_count).transpose()?.flatten() {
        n
    } else if let Some(n) = field("TresPerNode").map(gres_count).transpose()?.flatten() {
        n.checked_mul(nodes)
            .ok_or_else(|| error(WHAT, "GPU count overflows", line))?
    } else {
        0
    };
    Ok(Allocation { nodes, cpus, gpus })
}

/// How many job steps may run at once in `alloc`, each needing one CPU, at most `throttle`
/// (`--max-running`) when given. GPUs are counted per job by the scheduler.
pub fn step_slots(alloc: &Allocation, throttle: Option<usize>) -> usize {
    let cpus = alloc.cpus.max(1);
    throttle.map_or(cpus, |k| k.clamp(1, cpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_runs_wait_for_slurm_briefly_at_a_quick_pace_then_back_off() {
        assert_eq!(linger_poll(Duration::ZERO), Some(POLL_LINGER));
        assert_eq!(linger_poll(Duration::from_millis(999)), Some(POLL_LINGER));
        assert_eq!(linger_poll(LINGER_FAST), None);
        assert_eq!(linger_poll(Duration::MAX), None);
        assert!(POLL_LINGER < POLL_MIN);
    }

    #[test]
    fn only_a_private_directory_of_ones_own_holds_state() {
        assert_eq!(state_base_refusal(true, 1000, 0o40700, 1000), None);
        assert_eq!(state_base_refusal(true, 1000, 0o40755, 1000), None);
        let link = state_base_refusal(false, 1000, 0o120777, 1000).unwrap();
        assert!(link.contains("not a directory"), "{link}");
        let theirs = state_base_refusal(true, 1001, 0o40700, 1000).unwrap();
        assert!(
            theirs.contains("uid 1001") && theirs.contains("uid 1000"),
            "{theirs}"
        );
        let open = state_base_refusal(true, 1000, 0o41777, 1000).unwrap();
        assert!(open.contains("1777"), "{open}");
        assert!(state_base_refusal(true, 1000, 0o40770, 1000).is_some());
    }

    #[test]
    fn batches_group_by_gpus_and_chunk() {
        let pending: Vec<(usize, usize)> =
            vec![(0, 1), (1, 1), (2, 2), (3, 1), (4, 1), (5, 2), (6, 1)];
        let batches = plan_batches(&pending, 2);
        assert_eq!(
            batches,
            vec![
                Batch {
                    gpus: 1,
                    jobs: vec![0, 1]
                },
                Batch {
                    gpus: 1,
                    jobs: vec![3, 4]
                },
                Batch {
                    gpus: 1,
                    jobs: vec![6]
                },
                Batch {
                    gpus: 2,
                    jobs: vec![2, 5]
                },
            ]
        );
        assert_eq!(plan_batches(&[], 10), vec![]);
        // MaxArraySize 0 would make no progress: one task per array then.
        assert_eq!(plan_batches(&[(0, 0), (1, 0)], 0).len(), 2);
        let big: Vec<(usize, usize)> = (0..25_000).map(|j| (j, 1)).collect();
        let batches = plan_batches(&big, 10_001);
        let sizes: Vec<usize> = batches.iter().map(|b| b.jobs.len()).collect();
        assert_eq!(sizes, vec![10_001, 10_001, 4_998]);
        assert_eq!(batches[1].jobs[0], 10_001);
    }

    #[test]
    fn array_specs() {
        assert_eq!(array_spec(0, Some(4)), None);
        assert_eq!(array_spec(1, None).as_deref(), Some("0"));
        assert_eq!(array_spec(40, Some(4)).as_deref(), Some("0-39%4"));
        assert_eq!(array_spec(3, Some(0)).as_deref(), Some("0-2%1"));
    }

    #[test]
    fn submission_respects_the_throttle() {
        assert_eq!(may_submit(1, 0, None), None);
        assert_eq!(may_submit(0, 7, None), Some(None));
        assert_eq!(may_submit(0, 1, Some(4)), Some(Some(3)));
        assert_eq!(may_submit(0, 4, Some(4)), None);
        assert_eq!(may_submit(0, 5, Some(4)), None);
    }

    #[test]
    fn polling_backs_off_and_resets() {
        let long_ago = Duration::from_secs(60);
        let mut t = POLL_MIN;
        let mut seen = vec![t];
        for _ in 0..12 {
            t = next_poll(t, false, long_ago);
            seen.push(t);
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), POLL_MAX);
        assert!(seen[1] > POLL_MIN && seen[1] < Duration::from_millis(500));
        assert_eq!(next_poll(POLL_MAX, true, long_ago), POLL_MIN);
        assert_eq!(next_poll(Duration::ZERO, false, long_ago), POLL_MIN);
        assert_eq!(next_poll(Duration::MAX, false, long_ago), POLL_MAX);
        // Right after a submission: no backing off yet, whatever the queue did.
        assert_eq!(next_poll(POLL_MAX, false, Duration::ZERO), POLL_MIN);
        let just_before = POLL_FAST_AFTER_SUBMIT - Duration::from_millis(1);
        assert_eq!(next_poll(POLL_MAX, false, just_before), POLL_MIN);
        assert_eq!(next_poll(POLL_MIN, false, POLL_FAST_AFTER_SUBMIT), seen[1]);
    }

    #[test]
    fn the_states_asked_about_are_those_still_in_play_or_lost() {
        for state in SQUEUE_STATES.split(',') {
            assert!(
                state.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{state:?}"
            );
            let class = task_state(state).unwrap();
            assert_ne!(class, TaskState::Ended, "{state}");
        }
        assert_eq!(SQUEUE_STATES.split(',').count(), 17);
    }

    #[test]
    fn sbatch_ids() {
        assert_eq!(parse_sbatch("123\n"), Ok(123));
        assert_eq!(parse_sbatch("77;cluster\n"), Ok(77));
        let err = parse_sbatch("Submitted batch job 5").unwrap_err();
        assert!(err.to_string().contains("Submitted batch job 5"), "{err}");
        assert!(parse_sbatch("").is_err());
    }

    #[test]
    fn squeue_lines() {
        let out = "12|0|RUNNING|node1\n12|1|PENDING|\n13|N/A|RUNNING|node2\n\
                   12|2|PREEMPTED|node1\n12|3|COMPLETED|node1\n";
        let tasks = parse_squeue(out).unwrap();
        assert_eq!(tasks.len(), 4);
        assert_eq!(tasks[&(12, 0)].state, TaskState::Running);
        assert_eq!(tasks[&(12, 0)].node, "node1");
        assert_eq!(tasks[&(12, 1)].state, TaskState::Pending);
        assert_eq!(tasks[&(12, 2)].state, TaskState::Lost);
        assert_eq!(tasks[&(12, 3)].state, TaskState::Ended);
        assert_eq!(tasks[&(12, 3)].state_name, "COMPLETED");
        for bad in [
            "12|0|RUNNING",
            "x|0|RUNNING|n",
            "12|-1|RUNNING|n",
            "12|0|DANCING|n",
            "12|0|RUNNING|n|extra",
        ] {
            let err = parse_squeue(bad).unwrap_err();
            assert!(err.to_string().contains("squeue"), "{err}");
        }
        assert!(squeue_forgot(
            "slurm_load_jobs error: Invalid job id specified\n"
        ));
        assert!(!squeue_forgot(
            "squeue: error: Unable to contact slurm controller"
        ));
    }

    #[test]
    fn max_array_size() {
        let config = "Configuration data as of 2026-12-04\nMaxArraySize            = 1001\n\
                      MaxJobCount             = 10000\n";
        assert_eq!(parse_max_array_size(config), Ok(1001));
        assert!(parse_max_array_size("MaxArraySize = lots\n").is_err());
        assert!(parse_max_array_size("nothing\n").is_err());
    }

    #[test]
    fn allocations() {
        let salloc = "JobId=7 JobName=interactive JobState=RUNNING NodeList=localhost \
                      NumNodes=1 NumCPUs=4 NumTasks=4 CPUs/Task=1 \
                      TRES=cpu=4,mem=1G,node=1,billing=4 TresPerNode=gres:gpu:4 ";
        assert_eq!(
            parse_allocation(salloc),
            Ok(Allocation {
                nodes: 1,
                cpus: 4,
                gpus: 4
            })
        );
        let newer = "JobId=8 NumNodes=2 NumCPUs=16 TRES=cpu=16,node=2,gres/gpu=8,gres/gpu:a100=8 \
                     TresPerNode=gres/gpu:a100:4";
        assert_eq!(parse_allocation(newer).map(|a| a.gpus), Ok(8));
        let per_node = "JobId=9 NumNodes=2 NumCPUs=16 TRES=cpu=16 TresPerNode=gres:gpu:a100:2";
        assert_eq!(parse_allocation(per_node).map(|a| a.gpus), Ok(4));
        let per_job = "JobId=9 NumNodes=2 NumCPUs=16 TRES=cpu=16 TresPerJob=gres:gpu:3";
        assert_eq!(parse_allocation(per_job).map(|a| a.gpus), Ok(3));
        let none = "JobId=10 NumNodes=1 NumCPUs=2 TRES=cpu=2";
        assert_eq!(parse_allocation(none).map(|a| a.gpus), Ok(0));
        for bad in [
            "",
            "JobId=1 NumCPUs=2",
            "JobId=1 NumNodes=1-2 NumCPUs=2",
            "JobId=1 NumNodes=1 NumCPUs=2 TresPerNode=gres:gpu:many",
        ] {
            let err = parse_allocation(bad).unwrap_err();
            assert!(err.to_string().contains("scontrol"), "{err}");
        }
        let alloc = parse_allocation(salloc).unwrap();
        assert_eq!(step_slots(&alloc, None), 4);
        assert_eq!(step_slots(&alloc, Some(2)), 2);
        assert_eq!(step_slots(&alloc, Some(0)), 1);
        assert_eq!(step_slots(&alloc, Some(9)), 4);
    }
}
