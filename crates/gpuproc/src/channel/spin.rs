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

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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

/// How long this thread's next blocking receive may poll.
pub(crate) fn budget() -> Duration {
    let ceiling = ceiling_ns();
    let ns = BUDGET_NS.with(|b| b.get()).unwrap_or(ceiling).min(ceiling);
    Duration::from_nanos(ns)
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
    fn the_budget_never_exceeds_the_ceiling() {
        assert_eq!(next_budget(1 << 40, u64::MAX, CEIL), CEIL / 2);
        assert_eq!(next_budget(CEIL, 0, 0), 0);
        assert_eq!(next_budget(CEIL, 1, 0), 0);
    }
}
