//! Event sets (`nvmlEventSetCreate`, `nvmlDeviceRegisterEvents`, `nvmlEventSetWait`): the
//! scenario's XID errors reach every set that registered their GPU for XIDs, each `after_ms`
//! after that registration, once per set. Waits sleep without holding any lock.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::codes::{self, Code};
use crate::scenario::XidEvent;

/// `nvmlEventTypeXidCriticalError`.
pub const XID_CRITICAL_ERROR: u64 = 8;
/// The event types a GPU with ECC supports: single- and double-bit ECC, P-state, XID, clocks.
pub const SUPPORTED_WITH_ECC: u64 = 0x1F;
/// The same without the ECC events (GeForce).
pub const SUPPORTED_WITHOUT_ECC: u64 = 0x1C;

/// The handle values given out are this plus the set's number; never dereferenced.
const SET_MAGIC: usize = 0x5e7_0000_0000;

#[derive(Debug)]
struct Registration {
    gpu: usize,
    types: u64,
    since: Instant,
    delivered: usize,
}

#[derive(Debug, Default)]
struct Sets {
    next: usize,
    sets: BTreeMap<usize, Vec<Registration>>,
}

static SETS: Mutex<Sets> = Mutex::new(Sets {
    next: 1,
    sets: BTreeMap::new(),
});

fn sets() -> MutexGuard<'static, Sets> {
    SETS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The GPU index.
    pub gpu: usize,
    /// `nvmlEventType*`.
    pub event_type: u64,
    /// The XID.
    pub data: u64,
}

/// A new, empty set; its handle value.
pub fn create() -> usize {
    let mut s = sets();
    let id = s.next;
    s.next += 1;
    s.sets.insert(id, Vec::new());
    SET_MAGIC + id
}

fn id(handle: usize) -> Result<usize, Code> {
    handle
        .checked_sub(SET_MAGIC)
        .filter(|&i| i > 0)
        .ok_or(codes::INVALID_ARGUMENT)
}

/// Adds `types` for GPU `gpu` to the set; a GPU registered again keeps its start time.
pub fn register(handle: usize, gpu: usize, types: u64) -> Result<(), Code> {
    let mut s = sets();
    let regs = s
        .sets
        .get_mut(&id(handle)?)
        .ok_or(codes::INVALID_ARGUMENT)?;
    match regs.iter_mut().find(|r| r.gpu == gpu) {
        Some(r) => r.types |= types,
        None => regs.push(Registration {
            gpu,
            types,
            since: Instant::now(),
            delivered: 0,
        }),
    }
    Ok(())
}

/// Drops the set.
pub fn free(handle: usize) -> Result<(), Code> {
    sets()
        .sets
        .remove(&id(handle)?)
        .map(|_| ())
        .ok_or(codes::INVALID_ARGUMENT)
}

/// Waits up to `timeout` for the next event of the set; `xids(gpu)` gives each GPU's events.
/// `NVML_ERROR_TIMEOUT` when none comes in time.
pub fn wait(
    handle: usize,
    timeout: Duration,
    xids: impl Fn(usize) -> Vec<XidEvent>,
) -> Result<Event, Code> {
    let start = Instant::now();
    let deadline = start.checked_add(timeout);
    loop {
        let next_due = {
            let mut s = sets();
            let regs = s
                .sets
                .get_mut(&id(handle)?)
                .ok_or(codes::INVALID_ARGUMENT)?;
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for r in regs.iter_mut() {
                if r.types & XID_CRITICAL_ERROR == 0 {
                    continue;
                }
                let Some(e) = xids(r.gpu).get(r.delivered).copied() else {
                    continue;
                };
                let due = r
                    .since
                    .checked_add(Duration::from_millis(e.after_ms))
                    .unwrap_or(now);
                if due <= now {
                    r.delivered += 1;
                    return Ok(Event {
                        gpu: r.gpu,
                        event_type: XID_CRITICAL_ERROR,
                        data: e.xid,
                    });
                }
                next = Some(next.map_or(due, |n: Instant| n.min(due)));
            }
            next
        };
        let now = Instant::now();
        let until = match (next_due, deadline) {
            (Some(d), Some(dl)) => d.min(dl),
            (Some(d), None) => d,
            (None, Some(dl)) => dl,
            (None, None) => now.checked_add(Duration::from_secs(3600)).unwrap_or(now),
        };
        if deadline.is_some_and(|dl| now >= dl) {
            return Err(codes::TIMEOUT);
        }
        std::thread::sleep(until.saturating_duration_since(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_once_per_set_in_time() {
        let xids = |gpu: usize| {
            if gpu == 1 {
                vec![
                    XidEvent {
                        after_ms: 0,
                        xid: 48,
                    },
                    XidEvent {
                        after_ms: 30,
                        xid: 79,
                    },
                ]
            } else {
                Vec::new()
            }
        };
        let a = create();
        let b = create();
        register(a, 0, XID_CRITICAL_ERROR).unwrap();
        register(a, 1, XID_CRITICAL_ERROR).unwrap();
        register(b, 1, 4).unwrap(); // P-state only: no XIDs
        let first = wait(a, Duration::ZERO, xids).unwrap();
        assert_eq!((first.gpu, first.data), (1, 48));
        assert_eq!(wait(a, Duration::ZERO, xids), Err(codes::TIMEOUT));
        let second = wait(a, Duration::from_secs(10), xids).unwrap();
        assert_eq!(second.data, 79);
        assert_eq!(wait(a, Duration::from_millis(5), xids), Err(codes::TIMEOUT));
        assert_eq!(wait(b, Duration::ZERO, xids), Err(codes::TIMEOUT));
        free(a).unwrap();
        assert_eq!(free(a), Err(codes::INVALID_ARGUMENT));
        assert_eq!(
            wait(a, Duration::ZERO, xids).unwrap_err(),
            codes::INVALID_ARGUMENT
        );
        assert_eq!(register(12, 0, 8), Err(codes::INVALID_ARGUMENT));
        free(b).unwrap();
    }
}
