//! The pool's decisions, as pure functions: chunk sizes, how much to send a worker, retries.

use super::worker::{PHASE_INIT, PHASE_READY};
use super::PoolError;

/// Python's automatic chunk size for `map`: the input split into about four chunks per
/// worker, rounded up; at least 1.
pub fn auto_chunksize(len: usize, workers: usize) -> usize {
    let per = workers.max(1).saturating_mul(4);
    len.div_ceil(per).max(1)
}

/// A chunk with an explicit chunk size stops taking items once its arguments reach this
/// many bytes: the rest go in the next chunk (so that a chunk of large items neither waits
/// to be encoded whole nor holds gigabytes in one frame).
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

/// A chunk with the automatic chunk size (`map` and its kin without a chunk size) stops
/// taking items once its arguments reach this many bytes, as well as at Python's count
/// ([`auto_chunksize`]): large items go one or a few per message, so every worker gets work
/// as soon as the first items are encoded, and work spreads evenly over the workers.
///
/// 1 MiB: a message costs a few syscalls and wake-ups (tens of µs), against ~100 µs to
/// merely copy 1 MiB at memory speed, so the per-message overhead stays a few percent even
/// for data that moves at memory speed; and small items keep Python's chunking for any
/// realistic map (1,000,000 u64 with 2 workers is 8 chunks of 125,000 items, 1,000,000 bytes,
/// just under the budget).
pub const AUTO_CHUNK_BYTES: usize = 1 << 20;

/// Whether a chunk holding `items` tasks whose arguments take `bytes` bytes takes one more
/// task: while it has fewer than `chunksize` tasks and fewer than `max_bytes` bytes (so a
/// chunk always has at least one task, and at most one task past the byte budget).
pub fn chunk_takes_more(items: usize, bytes: usize, chunksize: usize, max_bytes: usize) -> bool {
    items < chunksize && (items == 0 || bytes < max_bytes)
}

/// The bytes to reserve for a chunk's arguments when its items took `bytes_per_task` each
/// in the last chunk: room for `chunksize` of them, or, when the byte budget `max_bytes`
/// ends the chunk first, for the budget plus the item that crosses it (so that a chunk of
/// items larger than the budget is not grown, and copied, as it is encoded).
pub fn chunk_capacity(chunksize: usize, bytes_per_task: usize, max_bytes: usize) -> usize {
    chunksize
        .saturating_mul(bytes_per_task)
        .min(max_bytes.saturating_add(bytes_per_task))
}

/// Checks a pool's counts as Python's `Pool` does (it raises `ValueError`): at least one
/// worker, and a `max_tasks_per_child`, when given, of at least one.
pub fn check_counts(processes: usize, max_tasks_per_child: Option<u64>) -> Result<(), PoolError> {
    if processes == 0 {
        return Err(PoolError::InvalidArgument {
            setting: "processes",
            value: processes.to_string(),
            expected: "a pool needs at least 1 worker process",
        });
    }
    if let Some(n @ 0) = max_tasks_per_child {
        return Err(PoolError::InvalidArgument {
            setting: "max_tasks_per_child",
            value: n.to_string(),
            expected: "expected at least 1 (or no limit, the default: workers live as long as \
                       the pool)",
        });
    }
    Ok(())
}

/// Whether a `Fork` pool must not fork now (unless allowed): when the process has `threads`
/// threads, `pool_threads` of them gpuproc pools' driver threads, and so more than one
/// thread (the caller) of its own. The pools' threads only hold the pools' locks, which a
/// worker never takes.
pub fn fork_refused(threads: usize, pool_threads: usize) -> bool {
    threads > pool_threads.saturating_add(1)
}

/// Whether a worker whose first unreported task is `next_seq` has not started it, so that
/// the task timeout runs for it (a worker hung before it could record a running task):
/// `phase` and `running` are read from its status page (`running` is the running task's
/// sequence number + 1, 0 between chunks). The time a worker takes to start is not counted
/// (a spawned worker re-runs the executable), except for a forked one, whose start is a
/// fork and nothing more, nor is its initializer's.
pub fn not_started(phase: u64, running: u64, next_seq: u64, forked: bool) -> bool {
    let counted = match phase {
        PHASE_READY => true,
        PHASE_INIT => false,
        _ => forked,
    };
    counted && running.checked_sub(1).is_none_or(|r| r < next_seq)
}

/// At most this many tasks are sent ahead to one worker (unless a single chunk is larger),
/// so that a slow worker does not hoard work and a dead one takes little with it.
pub const MAX_ITEMS_IN_FLIGHT: usize = 128;

/// Whether a worker with `chunks` chunks and `items` tasks in flight may be sent a chunk of
/// `next` more: always when idle, up to two chunks, or while small chunks fit the budget.
pub fn may_dispatch(chunks: usize, items: usize, next: usize) -> bool {
    chunks < 2 || items + next <= MAX_ITEMS_IN_FLIGHT
}

/// How many of a chunk's `len` tasks a worker may take when it will exit after `budget` more
/// (`max_tasks_per_child`); `None` means no limit.
pub fn take_for_budget(len: usize, budget: Option<u64>) -> usize {
    match budget {
        Some(b) => len.min(b as usize),
        None => len,
    }
}

/// What to do with a task whose worker died under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDeath {
    /// Run it again on another worker.
    Retry,
    /// Report the failure.
    Fail,
}

/// Retry a task whose worker died while `attempts` runs have been made, when `retries` are
/// allowed (the default is 0: report, do not retry).
pub fn after_worker_death(attempts: u32, retries: u32) -> AfterDeath {
    if attempts <= retries {
        AfterDeath::Retry
    } else {
        AfterDeath::Fail
    }
}

/// Whether to stop starting workers because the initializer failed in the last
/// `consecutive` workers started (no task finished in between), for a pool of `workers`:
/// twice the pool size, and at least three, so that a passing failure does not end the pool
/// but a broken initializer cannot make it start and lose workers for ever.
pub fn initializer_broken(consecutive: u32, workers: usize) -> bool {
    let limit = u32::try_from(workers.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .max(3);
    consecutive >= limit
}

/// How many tasks an ordered or unordered `imap` keeps in flight: enough to keep every
/// worker busy with two chunks, bounded so an endless input uses bounded memory.
pub fn imap_window(workers: usize, chunksize: usize) -> usize {
    let workers = workers.max(1);
    (workers.saturating_mul(chunksize.max(1)).saturating_mul(2))
        .max(MAX_ITEMS_IN_FLIGHT.saturating_mul(workers))
}

/// The fewest argument bytes an `imap` may keep in flight (when chunks are small).
pub const MIN_BYTES_IN_FLIGHT: usize = 32 << 20;

/// Whether an `imap` with `outstanding` tasks in flight, whose arguments take about
/// `bytes_per_task` bytes each in chunks of about `chunk_bytes`, may send more, given its
/// task `window`: fewer tasks than the window, and fewer argument bytes than three chunks
/// per worker (at least [`MIN_BYTES_IN_FLIGHT`]), so that large items stream through
/// bounded memory (and the shared memory they travel in is reused) however long the input.
/// One chunk can always go when nothing is in flight.
pub fn imap_sends_more(
    outstanding: usize,
    window: usize,
    bytes_per_task: usize,
    workers: usize,
    chunk_bytes: usize,
) -> bool {
    if outstanding == 0 {
        return true;
    }
    let byte_window = chunk_bytes
        .saturating_mul(workers.max(1))
        .saturating_mul(3)
        .max(MIN_BYTES_IN_FLIGHT);
    outstanding < window && outstanding.saturating_mul(bytes_per_task) < byte_window
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imap_keeps_a_bounded_number_of_bytes_in_flight() {
        // Small items: the task window decides.
        assert!(imap_sends_more(100, 256, 8, 2, 8));
        assert!(!imap_sends_more(256, 256, 8, 2, 8));
        // 4 MiB items, one per chunk, 2 workers: 32 MiB in flight at most (8 tasks).
        assert!(imap_sends_more(7, 256, 4 << 20, 2, 4 << 20));
        assert!(!imap_sends_more(8, 256, 4 << 20, 2, 4 << 20));
        // Big chunks: three per worker.
        assert!(imap_sends_more(5 * 64 - 1, 1 << 20, 1 << 20, 2, 64 << 20));
        assert!(!imap_sends_more(6 * 64, 1 << 20, 1 << 20, 2, 64 << 20));
        // Nothing in flight: always one more, whatever the sizes.
        assert!(imap_sends_more(0, 0, usize::MAX, usize::MAX, usize::MAX));
        assert!(!imap_sends_more(
            1,
            usize::MAX,
            usize::MAX,
            usize::MAX,
            usize::MAX
        ));
    }

    #[test]
    fn a_chunk_stops_at_its_count_or_its_byte_budget() {
        // Python's count.
        assert!(chunk_takes_more(0, 0, 3, AUTO_CHUNK_BYTES));
        assert!(chunk_takes_more(2, 16, 3, AUTO_CHUNK_BYTES));
        assert!(!chunk_takes_more(3, 24, 3, AUTO_CHUNK_BYTES));
        // The byte budget: one 4 MiB item fills a chunk; 1 MiB of small items too.
        assert!(!chunk_takes_more(1, 4 << 20, 2, AUTO_CHUNK_BYTES));
        assert!(!chunk_takes_more(
            131_072,
            1 << 20,
            1 << 20,
            AUTO_CHUNK_BYTES
        ));
        assert!(chunk_takes_more(
            131_071,
            (1 << 20) - 8,
            1 << 20,
            AUTO_CHUNK_BYTES
        ));
        // A chunk always takes its first item, whatever the budget.
        assert!(chunk_takes_more(0, 0, 1, 0));
        assert!(!chunk_takes_more(1, 1, 5, 0));
        // An explicit chunk size keeps the 64 MiB cap.
        assert!(chunk_takes_more(15, 60 << 20, 16, MAX_CHUNK_BYTES));
        assert!(!chunk_takes_more(16, 64 << 20, 32, MAX_CHUNK_BYTES));
    }

    #[test]
    fn a_chunk_reserves_room_for_its_items_up_to_the_budget_and_one_more() {
        // Small items: chunksize of them.
        assert_eq!(chunk_capacity(125_000, 8, AUTO_CHUNK_BYTES), 1_000_000);
        // 4 MiB items, over the 1 MiB budget: one whole item, not the budget.
        let item = (4 << 20) + 4;
        assert_eq!(
            chunk_capacity(2, item, AUTO_CHUNK_BYTES),
            AUTO_CHUNK_BYTES + item
        );
        // An explicit chunk size of 8 MiB items: up to 64 MiB and the item crossing it.
        assert_eq!(chunk_capacity(9, 8 << 20, MAX_CHUNK_BYTES), 72 << 20);
        assert_eq!(
            chunk_capacity(usize::MAX, usize::MAX, MAX_CHUNK_BYTES),
            usize::MAX
        );
    }

    #[test]
    fn small_items_keep_pythons_chunking() {
        // 1,000,000 u64 (8 bytes each as plain data) with 2 workers: Python's 125,000 per
        // chunk fit the byte budget, so the budget changes nothing.
        let n = auto_chunksize(1_000_000, 2);
        assert_eq!(n, 125_000);
        assert!(n * 8 <= AUTO_CHUNK_BYTES);
        assert!(chunk_takes_more(n - 1, (n - 1) * 8, n, AUTO_CHUNK_BYTES));
    }

    #[test]
    fn zero_workers_or_zero_tasks_per_child_are_invalid() {
        assert!(check_counts(1, None).is_ok());
        assert!(check_counts(4, Some(1)).is_ok());
        let e = check_counts(0, None).unwrap_err();
        assert!(e.is_invalid());
        assert_eq!(
            e.to_string(),
            "processes(0) is invalid: a pool needs at least 1 worker process"
        );
        let e = check_counts(2, Some(0)).unwrap_err();
        assert!(e.is_invalid());
        assert!(
            e.to_string()
                .starts_with("max_tasks_per_child(0) is invalid: expected at least 1"),
            "{e}"
        );
    }

    #[test]
    fn fork_is_refused_for_threads_that_are_not_the_pools() {
        assert!(!fork_refused(1, 0));
        assert!(fork_refused(2, 0));
        assert!(
            !fork_refused(2, 1),
            "a replacement forked beside the pool's own thread"
        );
        assert!(fork_refused(3, 1));
        assert!(!fork_refused(3, 2));
    }

    #[test]
    fn a_task_not_started_counts_once_the_worker_is_ready() {
        // Ready, between chunks or still on an earlier task: not started.
        assert!(not_started(PHASE_READY, 0, 5, false));
        assert!(not_started(PHASE_READY, 5, 5, false));
        // Running it, or past it.
        assert!(!not_started(PHASE_READY, 6, 5, false));
        assert!(!not_started(PHASE_READY, 9, 5, false));
        // In the initializer: never counted; starting: only when forked.
        assert!(!not_started(PHASE_INIT, 0, 0, true));
        assert!(!not_started(0, 0, 0, false));
        assert!(not_started(0, 0, 0, true));
    }

    #[test]
    fn chunksize_matches_python() {
        // Python: divmod(len, workers * 4), plus one if there is a remainder.
        assert_eq!(auto_chunksize(1_000_000, 2), 125_000);
        assert_eq!(auto_chunksize(10_000, 2), 1_250);
        assert_eq!(auto_chunksize(10_001, 2), 1_251);
        assert_eq!(auto_chunksize(3, 2), 1);
        assert_eq!(auto_chunksize(0, 2), 1);
        assert_eq!(auto_chunksize(100, 0), 25);
    }

    #[test]
    fn a_broken_initializer_is_given_up_on() {
        assert!(!initializer_broken(0, 2));
        assert!(!initializer_broken(3, 2));
        assert!(initializer_broken(4, 2));
        assert!(!initializer_broken(2, 1));
        assert!(initializer_broken(3, 1));
        assert!(initializer_broken(3, 0));
        assert!(!initializer_broken(15, 8));
        assert!(initializer_broken(16, 8));
    }

    #[test]
    fn dispatch_window() {
        assert!(may_dispatch(0, 0, 10_000));
        assert!(may_dispatch(1, 5_000, 5_000));
        assert!(!may_dispatch(2, 10_000, 5_000));
        assert!(may_dispatch(100, 100, 1));
        assert!(!may_dispatch(128, 128, 1));
    }

    #[test]
    fn budget_limits_chunks() {
        assert_eq!(take_for_budget(10, None), 10);
        assert_eq!(take_for_budget(10, Some(1)), 1);
        assert_eq!(take_for_budget(3, Some(5)), 3);
    }

    #[test]
    fn retries() {
        assert_eq!(after_worker_death(1, 0), AfterDeath::Fail);
        assert_eq!(after_worker_death(1, 1), AfterDeath::Retry);
        assert_eq!(after_worker_death(2, 1), AfterDeath::Fail);
    }

    #[test]
    fn imap_window_is_bounded_and_busy() {
        assert_eq!(imap_window(2, 1), 256);
        assert_eq!(imap_window(2, 1_000), 4_000);
        // A huge chunk size saturates instead of overflowing.
        assert_eq!(imap_window(2, usize::MAX), usize::MAX);
        assert_eq!(imap_window(usize::MAX, 1), usize::MAX);
    }
}
