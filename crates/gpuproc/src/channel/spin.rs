//! How long a blocking receive polls before it sleeps.
//!
//! A receiver that goes to sleep in the kernel must be woken by the sender, and waking a
//! sleeping process costs tens of microseconds on many machines (an idle CPU in a deep
//! C-state, a virtual CPU the hypervisor has descheduled): more than the message itself.
//! So a blocking `recv`/`get` first polls the socket without blocking for a short,
//! adaptive while — like glibc's adaptive mutexes or MPI's progress loops — and only then
//! sleeps. Each thread keeps its own spin budget:
//!
//! - a receive whose message came within the ceiling ([`MAX_SPIN`] by default) of the call
//!   (spinning would have caught it, or did) sets the budget to the ceiling;
//! - a receive that waited longer halves the budget, down to zero, so that a thread whose
//!   messages come rarely stops burning CPU after a few waits.
//!
//! [`set_max_spin`] changes the ceiling for the whole process (zero turns spinning off). On
//! a machine with a single CPU the default ceiling is zero.
//!
//! # Never slower than sleeping
//! Polling pays only while the sender has a CPU of its own. On a loaded machine (every CPU
//! busy, as in a pool doing real work) a polling receiver takes CPU time from the very
//! process it waits for, and a round trip becomes slower than if it had slept at once. So
//! a receive does not poll at all while more tasks are runnable than this process may use
//! CPUs: the kernel's count of runnable tasks (the fourth field of `/proc/loadavg`, which
//! counts the reader itself) is compared with [`std::thread::available_parallelism`]
//! (the CPUs this process may run on, within its cgroup's quota). The count is read at most
//! once every [`LOAD_CHECK_EVERY`] per process (a few microseconds each time), and the
//! verdict shared by every thread. The count is the whole machine's: in a container that
//! may use only some of its CPUs, a busy machine turns polling off even if those CPUs are
//! idle (sleeping is then at worst as fast as it would be without polling).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The default ceiling of the spin budget: long enough to cover the reply of a peer that
/// answers at once, short enough that a thread waiting for rare messages wastes little.
pub const MAX_SPIN: Duration = Duration::from_micros(50);

/// A budget under this is not worth a spin: it becomes zero.
const MIN_SPIN_NS: u64 = 2_000;

/// The process-wide ceiling, in nanoseconds ([`UNSET`] until first used or set).
static CEILING_NS: AtomicU64 = AtomicU64::new(UNSET);

/// [`CEILING_NS`] before anything set it.
const UNSET: u64 = u64::MAX;

/// The ceiling in nanoseconds: as set, else [`MAX_SPIN`] — or zero on a machine with one
/// CPU, where a spinning receiver could only delay the sender it waits for.
fn ceiling_ns() -> u64 {
    let v = CEILING_NS.load(Relaxed);
    if v != UNSET {
        return v;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = if cpus > 1 {
        MAX_SPIN.as_nanos() as u64
    } else {
        0
    };
    // Another thread may have set it meanwhile: its value wins.
    match CEILING_NS.compare_exchange(UNSET, default, Relaxed, Relaxed) {
        Ok(_) => default,
        Err(set) => set,
    }
}

thread_local! {
    /// This thread's budget, in nanoseconds (starts at the ceiling).
    static BUDGET_NS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Sets how long a blocking receive in this process may poll before it sleeps (default
/// [`MAX_SPIN`], or zero on a machine with a single CPU); `Duration::ZERO` turns polling off, so that every blocking receive
/// sleeps at once (for machines with more busy processes than cores, where a spinning
/// receiver would take CPU time from the process it waits for).
///
/// Each process has its own setting: a child started afterwards inherits it only when it
/// is forked (not with the spawn or fork-server start methods), so call this in the
/// child's target too where it matters.
pub fn set_max_spin(max: Duration) {
    let ns = u64::try_from(max.as_nanos())
        .unwrap_or(UNSET - 1)
        .min(UNSET - 1);
    CEILING_NS.store(ns, Relaxed);
}

/// The ceiling set by [`set_max_spin`].
pub fn max_spin() -> Duration {
    Duration::from_nanos(ceiling_ns())
}

/// How long this thread's next blocking receive may poll: nothing while the machine is
/// loaded (see the module docs), else the thread's budget.
pub(crate) fn budget() -> Duration {
    let ceiling = ceiling_ns();
    if ceiling == 0 || loaded() {
        return Duration::ZERO;
    }
    let ns = BUDGET_NS.with(|b| b.get()).unwrap_or(ceiling).min(ceiling);
    Duration::from_nanos(ns)
}

/// How often a process looks again at how many tasks are runnable.
pub const LOAD_CHECK_EVERY: Duration = Duration::from_millis(10);

/// When the load was last looked at, in nanoseconds after [`epoch`] (`u64::MAX`: never).
static LOAD_CHECKED_NS: AtomicU64 = AtomicU64::new(u64::MAX);
/// The verdict of the last look.
static LOADED: AtomicBool = AtomicBool::new(false);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether more tasks are runnable than this process has CPUs, as last seen (looking
/// again if the last look is older than [`LOAD_CHECK_EVERY`]; one thread looks, the
/// others use the verdict they find).
fn loaded() -> bool {
    let now = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
    let last = LOAD_CHECKED_NS.load(Relaxed);
    if !needs_check(last, now, LOAD_CHECK_EVERY.as_nanos() as u64) {
        return LOADED.load(Relaxed);
    }
    if LOAD_CHECKED_NS
        .compare_exchange(last, now, Relaxed, Relaxed)
        .is_err()
    {
        return LOADED.load(Relaxed);
    }
    let mut buf = [0u8; 128];
    let running =
        crate::sys::seqpacket::read_loadavg(&mut buf).and_then(|n| runnable_in_loadavg(&buf[..n]));
    let loaded = !may_spin(running, cpus());
    LOADED.store(loaded, Relaxed);
    loaded
}

/// The CPUs this process may use (read once).
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether a verdict taken at `last_ns` (`u64::MAX`: never) is stale at `now_ns`.
fn needs_check(last_ns: u64, now_ns: u64, every_ns: u64) -> bool {
    last_ns == u64::MAX || now_ns.saturating_sub(last_ns) >= every_ns
}

/// The number of runnable tasks in the contents of `/proc/loadavg`: the `3` of
/// `"0.52 0.58 0.59 3/1234 5678"`.
fn runnable_in_loadavg(loadavg: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split_once('/')?.0.parse().ok()
}

/// Whether polling may pay: only while the runnable tasks (the reader among them) are no
/// more than the CPUs, so that the peer has a CPU while this thread polls. Unknown load
/// (no `/proc`): polling stays on, the adaptive budget still bounds it.
fn may_spin(running: Option<u32>, cpus: usize) -> bool {
    running.is_none_or(|r| usize::try_from(r).is_ok_and(|r| r <= cpus))
}

/// Records how long a blocking receive waited for its message.
pub(crate) fn record(waited: Duration) {
    let ceiling = ceiling_ns();
    BUDGET_NS.with(|b| {
        let now = b.get().unwrap_or(ceiling);
        b.set(Some(next_budget(now, waited_ns(waited), ceiling)));
    });
}

fn waited_ns(waited: Duration) -> u64 {
    u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX)
}

/// The budget after a receive that waited `waited_ns` for its message, given the budget it
/// had and the ceiling (see the module docs).
fn next_budget(budget_ns: u64, waited_ns: u64, ceiling_ns: u64) -> u64 {
    if waited_ns <= ceiling_ns {
        return ceiling_ns;
    }
    let half = budget_ns.min(ceiling_ns) / 2;
    if half < MIN_SPIN_NS {
        0
    } else {
        half
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CEIL: u64 = 50_000;

    #[test]
    fn a_prompt_message_restores_the_full_budget() {
        assert_eq!(next_budget(0, 10_000, CEIL), CEIL);
        assert_eq!(next_budget(CEIL, CEIL, CEIL), CEIL);
    }

    #[test]
    fn long_waits_halve_the_budget_down_to_zero() {
        let mut b = CEIL;
        let mut seen = Vec::new();
        for _ in 0..6 {
            b = next_budget(b, 10 * CEIL, CEIL);
            seen.push(b);
        }
        assert_eq!(seen, [25_000, 12_500, 6_250, 3_125, 0, 0]);
        // And one prompt message brings it back.
        assert_eq!(next_budget(b, 1, CEIL), CEIL);
    }

    #[test]
    fn the_runnable_count_is_read_from_loadavg() {
        assert_eq!(
            runnable_in_loadavg(b"0.52 0.58 0.59 3/1234 5678\n"),
            Some(3)
        );
        assert_eq!(runnable_in_loadavg(b"1.00 2.00 3.00 17/90 1"), Some(17));
        for bad in [
            &b""[..],
            b"0.5 0.5 0.5",
            b"0.5 0.5 0.5 x/10 1",
            b"0 0 0 3 1",
            b"\xff",
        ] {
            assert_eq!(runnable_in_loadavg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn polling_stops_when_more_tasks_are_runnable_than_cpus() {
        // Idle, or the two ends of a round trip on two CPUs: poll.
        assert!(may_spin(Some(1), 2));
        assert!(may_spin(Some(2), 2));
        // A CPU hog on each CPU, and this receiver: sleep.
        assert!(!may_spin(Some(3), 2));
        assert!(!may_spin(Some(65), 64));
        assert!(!may_spin(Some(u32::MAX), 1));
        // Unknown: the adaptive budget alone decides.
        assert!(may_spin(None, 8));
    }

    #[test]
    fn the_load_is_looked_at_again_only_after_a_while() {
        assert!(needs_check(u64::MAX, 0, 10));
        assert!(!needs_check(100, 105, 10));
        assert!(needs_check(100, 110, 10));
        // A clock read before the last check (another thread's) is not stale.
        assert!(!needs_check(100, 50, 10));
    }

    #[test]
    fn the_budget_never_exceeds_the_ceiling() {
        assert_eq!(next_budget(1 << 40, u64::MAX, CEIL), CEIL / 2);
        assert_eq!(next_budget(CEIL, 0, 0), 0);
        assert_eq!(next_budget(CEIL, 1, 0), 0);
    }
}
