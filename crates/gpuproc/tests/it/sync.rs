//! `gpuproc::sync` across processes: mutual exclusion, a holder killed with SIGKILL, events,
//! semaphores, barriers, conditions; and the `sync_lock` example.

use std::time::Duration;

use gpuproc::shm::SharedValue;
use gpuproc::sync::{Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore};
use gpuproc::StartMethod;

use crate::support::{self, start, TIMEOUT};

fn increment((lock, counter, times): (Lock, SharedValue<u64>, u32)) {
    for _ in 0..times {
        let _g = lock.lock_timeout(TIMEOUT).unwrap().expect("lock in time");
        // A read and a separate write: only the lock keeps increments from being lost.
        let n = counter.get();
        std::hint::black_box(());
        counter.set(n + 1);
    }
}

#[test]
fn lock_gives_mutual_exclusion_across_processes() {
    const N: usize = 4;
    const M: u32 = 2000;
    for m in StartMethod::all() {
        let lock = Lock::new().unwrap();
        let counter = SharedValue::new_unlocked(0u64).unwrap();
        let mut ps: Vec<_> = (0..N)
            .map(|_| start(m, increment, (lock.clone(), counter.clone(), M)))
            .collect();
        for p in &mut ps {
            p.join_timeout(TIMEOUT).unwrap();
        }
        assert_eq!(counter.get(), N as u64 * u64::from(M), "{m:?}");
    }
}

fn lock_and_hang((lock, locked): (Lock, Event)) {
    let guard = lock.lock().unwrap();
    locked.set();
    std::mem::forget(guard); // hold it until killed
    support::block_forever()
}

#[test]
fn a_holder_killed_with_sigkill_hands_the_lock_on_with_owner_died() {
    for m in StartMethod::all() {
        let lock = Lock::new().unwrap();
        let locked = Event::new().unwrap();
        let mut p = start(m, lock_and_hang, (lock.clone(), locked.clone()));
        assert!(locked.wait_timeout(TIMEOUT), "{m:?}: child never locked");
        assert!(
            lock.try_lock().unwrap().is_none(),
            "{m:?}: held by the child"
        );
        // A waiter already blocked when the holder dies is woken too.
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let g = lock.lock_timeout(TIMEOUT).unwrap().expect("woken in time");
                g.owner_died()
            })
        };
        p.kill().unwrap();
        assert!(p.join_timeout(TIMEOUT).unwrap_err().is_killed());
        assert!(waiter.join().unwrap(), "{m:?}: owner death not reported");
        // It is a normal lock again.
        let g = lock.lock_timeout(TIMEOUT).unwrap().unwrap();
        assert!(!g.owner_died());
    }
}

fn rlock_twice_and_hang((lock, locked): (RLock, Event)) {
    let _ = lock.acquire().unwrap();
    let _ = lock.acquire().unwrap();
    locked.set();
    support::block_forever()
}

#[test]
fn an_rlock_whose_holder_dies_is_handed_on() {
    let lock = RLock::new().unwrap();
    let locked = Event::new().unwrap();
    let mut p = start(
        StartMethod::ForkServer,
        rlock_twice_and_hang,
        (lock.clone(), locked.clone()),
    );
    assert!(locked.wait_timeout(TIMEOUT));
    assert!(lock.try_acquire().unwrap().is_none());
    p.kill().unwrap();
    let _ = p.join_timeout(TIMEOUT);
    let a = lock.acquire_timeout(TIMEOUT).unwrap().expect("in time");
    assert!(a.owner_died());
    lock.release().unwrap();
    assert!(!lock.try_acquire().unwrap().unwrap().owner_died());
    lock.release().unwrap();
}

#[test]
fn event_set_in_a_child_wakes_the_parent() {
    fn set_it(e: Event) {
        e.set()
    }
    for m in StartMethod::all() {
        let e = Event::new().unwrap();
        assert!(!e.wait_timeout(Duration::from_millis(1)));
        let mut p = start(m, set_it, e.clone());
        assert!(e.wait_timeout(TIMEOUT), "{m:?}");
        assert!(e.is_set());
        p.join_timeout(TIMEOUT).unwrap();
        e.clear();
        assert!(!e.is_set());
    }
}

#[test]
fn semaphore_counts_across_processes() {
    fn release_three(s: Semaphore) {
        for _ in 0..3 {
            s.release().unwrap();
        }
    }
    fn take_two(s: Semaphore) -> bool {
        s.acquire_timeout(TIMEOUT) && s.acquire_timeout(TIMEOUT)
    }
    let s = Semaphore::new(0).unwrap();
    let mut p = start(StartMethod::ForkServer, release_three, s.clone());
    for _ in 0..3 {
        assert!(s.acquire_timeout(TIMEOUT));
    }
    p.join_timeout(TIMEOUT).unwrap();
    assert!(!s.try_acquire());
    assert_eq!(s.get_value(), 0);
    // A child waiting on it is woken by releases here.
    let mut p = start(StartMethod::Spawn, take_two, s.clone());
    s.release_n(2).unwrap();
    assert!(p.join_timeout(TIMEOUT).unwrap());
    assert_eq!(s.get_value(), 0);
}

#[test]
fn bounded_semaphore_refuses_over_release_in_a_child() {
    fn over_release(s: BoundedSemaphore) -> (bool, String) {
        let err = s.release().unwrap_err();
        (err.is_over_released(), err.to_string())
    }
    let s = BoundedSemaphore::new(2).unwrap();
    let mut p = start(StartMethod::ForkServer, over_release, s.clone());
    let (over, msg) = p.join_timeout(TIMEOUT).unwrap();
    assert!(over, "{msg}");
    assert!(msg.contains("initial value 2"), "{msg}");
    assert!(s.try_acquire());
    s.release().unwrap();
    assert_eq!(s.get_value(), 2);
}

#[test]
fn barrier_lets_three_processes_pass_together() {
    fn meet(b: Barrier) -> u32 {
        let first = b.wait_timeout(TIMEOUT).unwrap();
        b.wait_timeout(TIMEOUT).unwrap(); // and a second round
        first
    }
    for m in StartMethod::all() {
        let b = Barrier::new(3).unwrap();
        let mut ps: Vec<_> = (0..3).map(|_| start(m, meet, b.clone())).collect();
        let mut idx: Vec<u32> = ps
            .iter_mut()
            .map(|p| p.join_timeout(TIMEOUT).unwrap())
            .collect();
        idx.sort();
        assert_eq!(idx, [0, 1, 2], "{m:?}");
        assert_eq!(b.n_waiting(), 0);
    }
}

#[test]
fn barrier_timeout_breaks_it_for_every_waiter() {
    fn wait_long(b: Barrier) -> bool {
        b.wait_timeout(TIMEOUT).unwrap_err().is_broken_barrier()
    }
    let b = Barrier::new(3).unwrap();
    let mut p = start(StartMethod::ForkServer, wait_long, b.clone());
    // Two of three arrive; the parent's short timeout breaks the barrier for the child too.
    let e = b.wait_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(e.is_broken_barrier());
    assert!(p.join_timeout(TIMEOUT).unwrap());
    assert!(b.broken());
    let b = Barrier::new(2).unwrap();
    b.abort();
    assert!(b.wait().unwrap_err().is_broken_barrier());
}

#[test]
fn condition_notify_wakes_a_waiter_in_another_process() {
    fn produce((cond, ready): (Condition, SharedValue<u32>)) {
        let _g = cond.lock().unwrap();
        ready.set(42);
        cond.notify_all();
    }
    for m in StartMethod::all() {
        let cond = Condition::new().unwrap();
        let ready = SharedValue::new_unlocked(0u32).unwrap();
        let mut g = cond.lock().unwrap();
        let mut p = start(m, produce, (cond.clone(), ready.clone()));
        let ok = cond
            .wait_for(&mut g, || ready.get() == 42, Some(TIMEOUT))
            .unwrap();
        assert!(ok, "{m:?}");
        drop(g);
        p.join_timeout(TIMEOUT).unwrap();
    }
}

#[test]
fn condition_wait_refuses_another_locks_guard() {
    let cond = Condition::new().unwrap();
    let other = Lock::new().unwrap();
    let mut g = other.lock().unwrap();
    let e = cond
        .wait_timeout(&mut g, Duration::from_millis(1))
        .unwrap_err();
    assert!(matches!(e, gpuproc::sync::SyncError::WrongLock), "{e}");
    // The condition's own lock, passed through a child and back, is the same lock.
    fn back(l: Lock) -> Lock {
        l
    }
    let mut p = start(StartMethod::ForkServer, back, cond.get_lock().clone());
    let same = p.join_timeout(TIMEOUT).unwrap();
    let mut g = same.lock().unwrap();
    assert!(!cond.wait_timeout(&mut g, Duration::from_millis(1)).unwrap());
}

#[test]
fn sync_lock_example_prints_ten_whole_lines() {
    let mut lines = crate::support::stdout_lines(&crate::support::run_example("sync_lock"));
    lines.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("hello world {i}")).collect();
    want.sort();
    assert_eq!(lines, want);
}

#[test]
fn duration_max_timeouts_mean_no_limit() {
    let lock = Lock::new().unwrap();
    assert!(lock.lock_timeout(Duration::MAX).unwrap().is_some());
    let a = lock.acquire_timeout(Duration::MAX).unwrap();
    assert!(a.is_some());
    lock.release().unwrap();
    let rlock = RLock::new().unwrap();
    let g1 = rlock.lock_timeout(Duration::MAX).unwrap();
    let g2 = rlock.lock_timeout(Duration::MAX).unwrap();
    assert!(g1.is_some() && g2.is_some());
    drop((g1, g2));
    let s = Semaphore::new(1).unwrap();
    assert!(s.acquire_timeout(Duration::MAX));
    let b = BoundedSemaphore::new(1).unwrap();
    assert!(b.acquire_timeout(Duration::MAX));
    b.release().unwrap();
    let e = Event::new().unwrap();
    e.set();
    assert!(e.wait_timeout(Duration::MAX));
    let c = Condition::new().unwrap();
    let mut g = c.lock_timeout(Duration::MAX).unwrap().unwrap();
    assert!(c.wait_for(&mut g, || true, Some(Duration::MAX)).unwrap());
    drop(g);
    let barrier = Barrier::new(1).unwrap();
    assert_eq!(barrier.wait_timeout(Duration::MAX).unwrap(), 0);
    // A wait that must sleep first: set from another thread.
    let e2 = Event::new().unwrap();
    let setter = e2.clone();
    let t = std::thread::spawn(move || setter.set());
    assert!(e2.wait_timeout(Duration::MAX));
    t.join().unwrap();
}
