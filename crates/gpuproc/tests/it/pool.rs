//! `Pool`: results, laziness, and faults (dead workers, panics, timeouts, termination).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuproc::{Pool, PoolError, StartMethod};

use crate::support::{self, TIMEOUT};

fn square(x: u64) -> u64 {
    x * x
}

fn pid_of(_: u64) -> u32 {
    std::process::id()
}

fn block(_: u64) -> u64 {
    support::block_forever()
}

/// Busy for about `micros` microseconds, then returns `x * x`.
fn busy_square((x, micros): (u64, u64)) -> u64 {
    let until = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    x * x
}

/// A builder for a pool of two workers started with `m` (forking this multi-threaded test
/// binary allowed).
fn two_workers(m: StartMethod) -> gpuproc::pool::PoolBuilder {
    Pool::builder()
        .processes(2)
        .start_method(m)
        .allow_fork_with_threads(true)
}

#[test]
fn map_with_every_start_method() {
    for m in StartMethod::all() {
        let pool = two_workers(m).build().unwrap();
        let got = pool.map(square, 0..1000u64).unwrap();
        assert_eq!(
            got,
            (0..1000u64).map(|x| x * x).collect::<Vec<_>>(),
            "{m:?}"
        );
        assert_eq!(
            pool.map_chunksize(square, 0..100u64, 1).unwrap()[99],
            99 * 99
        );
        assert!(pool.map(square, Vec::<u64>::new()).unwrap().is_empty());
        pool.close();
        pool.join().unwrap();
    }
}

#[test]
fn imap_is_ordered_and_lazy_on_an_endless_input() {
    let pool = Pool::new(2).unwrap();
    let first: Vec<u64> = pool
        .imap(square, 0u64..)
        .take(5000)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first, (0..5000u64).map(|x| x * x).collect::<Vec<_>>());
    let mut unordered: Vec<u64> = pool
        .imap_unordered(square, 0..3000u64)
        .chunksize(7)
        .map(Result::unwrap)
        .collect();
    unordered.sort();
    assert_eq!(unordered, (0..3000u64).map(|x| x * x).collect::<Vec<_>>());
    // starmap: a tuple argument.
    assert_eq!(
        pool.starmap(busy_square, [(3, 0), (4, 0)]).unwrap(),
        [9, 16]
    );
}

#[test]
fn apply_and_apply_async() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.apply(square, 12).unwrap(), 144);
    let mut r = pool.apply_async(square, 5).unwrap();
    r.wait();
    assert!(r.ready());
    assert_eq!(r.successful(), Some(true));
    assert_eq!(r.get_timeout(TIMEOUT).unwrap(), 25);
    assert!(matches!(
        r.get_timeout(TIMEOUT),
        Err(PoolError::AlreadyTaken)
    ));

    let mut slow = pool.apply_async(block, 0).unwrap();
    let err = slow.get_timeout(Duration::from_millis(50)).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(!slow.ready());
    pool.terminate();
    assert!(slow.get_timeout(TIMEOUT).unwrap_err().is_terminated());
}

fn panics_on_7(x: u64) -> u64 {
    assert!(x != 7, "seven is not allowed");
    x
}

#[test]
fn a_panicking_task_fails_alone_and_the_worker_survives() {
    let pool = Pool::new(2).unwrap();
    let pids = pool.worker_pids();
    let results = pool.map_results(panics_on_7, 0..20u64);
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            let e = r.as_ref().unwrap_err();
            assert!(e.is_panic(), "{e}");
            assert_eq!(e.index(), Some(7));
            assert!(e.to_string().contains("seven is not allowed"), "{e}");
        } else {
            assert_eq!(*r.as_ref().unwrap(), i as u64);
        }
    }
    let err = pool.map(panics_on_7, 0..20u64).unwrap_err();
    assert_eq!(err.index(), Some(7));
    assert_eq!(pool.worker_pids(), pids, "a panic must not cost a worker");
}

fn exits_on_3(x: u64) -> u64 {
    if x == 3 {
        std::process::exit(3);
    }
    x
}

#[test]
fn a_task_that_exits_fails_with_its_index_and_the_worker_is_replaced() {
    let pool = Pool::new(2).unwrap();
    let results = pool.map_results(exits_on_3, 0..50u64);
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (
                3,
                Err(PoolError::WorkerDied {
                    index: 3, status, ..
                }),
            ) => {
                assert_eq!(status.exitcode(), 3)
            }
            (3, other) => panic!("task 3: {other:?}"),
            (i, r) => assert_eq!(*r.as_ref().unwrap(), i as u64),
        }
    }
    assert_eq!(pool.worker_pids().len(), 2);
    assert_eq!(pool.map(square, 0..10u64).unwrap()[9], 81);
}

#[test]
fn kill_a_random_worker_during_a_map_twenty_times() {
    let pool = Pool::new(2).unwrap();
    let mut killed_tasks = 0;
    for round in 0..20u64 {
        let n = 10_000u64;
        let chunksize = 1 + (round as usize % 3) * 600; // 1, 601, 1201
        let mut it = pool
            .imap(busy_square, (0..n).map(|x| (x, 20)))
            .chunksize(chunksize);
        let first = it.next().unwrap().unwrap();
        assert_eq!(first, 0);
        let pids = pool.worker_pids();
        let victim = pids[(round as usize) % pids.len()];
        // SAFETY: a plain system call on one of our pool's workers.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let mut seen = 1;
        for (i, r) in it.enumerate() {
            let i = i as u64 + 1;
            seen += 1;
            match r {
                Ok(v) => assert_eq!(v, i * i),
                Err(e) => {
                    assert!(e.is_worker_died(), "round {round}: {e}");
                    assert_eq!(e.index(), Some(i));
                    assert!(e.to_string().contains("SIGKILL"), "{e}");
                    killed_tasks += 1;
                }
            }
        }
        assert_eq!(seen, n, "round {round}: every task has an outcome");
        assert!(killed_tasks <= round + 1, "at most one task per kill");
    }
    assert!(killed_tasks >= 1, "some kill must have hit a running task");
}

#[test]
fn max_tasks_per_child_one_over_500_tasks() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let pids = pool.map(pid_of, 0..500u64).unwrap();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 500, "each task ran in a fresh worker");
}

#[test]
fn a_task_that_never_returns_is_cut_by_the_task_timeout() {
    let pool = Pool::builder()
        .processes(2)
        .task_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = pool.apply(block, 1).unwrap_err();
    assert!(err.is_task_timeout(), "{err}");
    assert_eq!(pool.apply(square, 3).unwrap(), 9);
}

#[test]
fn terminate_during_work_is_prompt_and_leaves_no_processes() {
    let pool = Pool::new(2).unwrap();
    let handles: Vec<_> = (0..10)
        .map(|i| pool.apply_async(block, i).unwrap())
        .collect();
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2);
    pool.terminate();
    for mut h in handles {
        assert!(h.get_timeout(TIMEOUT).unwrap_err().is_terminated());
    }
    let left = support::wait_all_ended(&pids, Instant::now() + TIMEOUT);
    assert!(left.is_empty(), "workers left after terminate: {left:?}");
    assert!(matches!(
        pool.apply_async(square, 1),
        Err(PoolError::Closed)
    ));
}

#[test]
fn many_queued_apply_async_calls_use_no_descriptors() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.apply(square, 1).unwrap(), 1);
    let before = support::open_fds();
    let handles: Vec<_> = (0..100_000u64)
        .map(|i| pool.apply_async(square, i).unwrap())
        .collect();
    let during = support::open_fds();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.get().unwrap(), (i * i) as u64);
    }
    assert!(
        during < before + 50,
        "{before} descriptors before, {during} with 100,000 queued"
    );
}

static INITIALIZED_WITH: AtomicU64 = AtomicU64::new(0);

fn init_worker(v: u64) {
    INITIALIZED_WITH.store(v, Ordering::SeqCst);
}

fn read_init(_: u64) -> (u64, Option<String>, Option<String>) {
    (
        INITIALIZED_WITH.load(Ordering::SeqCst),
        std::env::var("POOL_ALL").ok(),
        std::env::var("POOL_SLOT").ok(),
    )
}

#[test]
fn initializer_and_environment() {
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_worker, 41)
        .env("POOL_ALL", "yes")
        .worker_env(|slot| vec![("POOL_SLOT".to_string(), slot.to_string())])
        .build()
        .unwrap();
    let seen = pool.map_chunksize(read_init, 0..50u64, 1).unwrap();
    for (v, all, slot) in &seen {
        assert_eq!(*v, 41);
        assert_eq!(all.as_deref(), Some("yes"));
        assert!(matches!(slot.as_deref(), Some("0") | Some("1")), "{slot:?}");
    }
}

/// Kills its own worker the first time it runs (it leaves a marker file), succeeds after.
fn dies_once(marker: String) -> u64 {
    if std::fs::metadata(&marker).is_err() {
        std::fs::write(&marker, b"x").unwrap();
        // SAFETY: a plain system call on ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    42
}

#[test]
fn retries_run_a_task_again_after_its_worker_died() {
    let dir = std::env::temp_dir().join(format!("gpuproc-retry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("ran").to_string_lossy().into_owned();
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::builder().processes(1).retries(1).build().unwrap();
    assert_eq!(pool.apply(dies_once, marker.clone()).unwrap(), 42);
    let _ = std::fs::remove_file(&marker);
    let no_retry = Pool::new(1).unwrap();
    let err = no_retry.apply(dies_once, marker.clone()).unwrap_err();
    assert!(err.is_worker_died(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn close_then_join_finishes_queued_work() {
    let pool = Pool::new(2).unwrap();
    let handles: Vec<_> = (0..100u64)
        .map(|i| pool.apply_async(square, i).unwrap())
        .collect();
    let pids = pool.worker_pids();
    pool.close();
    assert!(matches!(
        pool.apply_async(square, 1),
        Err(PoolError::Closed)
    ));
    pool.join().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.get().unwrap(), (i * i) as u64);
    }
    let left = support::wait_all_ended(&pids, Instant::now() + TIMEOUT);
    assert!(left.is_empty());
}

/// Plain data of several layouts: numbers, tuples, arrays, nested structs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct Particle {
    pos: [f32; 3],
    id: (u16, i64),
    alive: bool,
    tag: char,
}

fn step(p: Particle) -> (Particle, f64) {
    let moved = Particle {
        pos: [p.pos[0] + 1.0, p.pos[1] * 2.0, -p.pos[2]],
        id: (p.id.0.wrapping_add(1), p.id.1 - 1),
        alive: !p.alive,
        tag: p.tag.to_ascii_uppercase(),
    };
    (moved, f64::from(p.pos[0]) * 0.5)
}

fn particle(i: u64) -> Particle {
    Particle {
        pos: [i as f32, 1.5, -(i as f32)],
        id: (i as u16, -(i as i64)),
        alive: i % 3 == 0,
        tag: char::from(b'a' + (i % 26) as u8),
    }
}

#[test]
fn plain_structs_round_trip_through_a_map() {
    let pool = Pool::new(2).unwrap();
    let input: Vec<Particle> = (0..5000).map(particle).collect();
    let got = pool.map(step, input.clone()).unwrap();
    let want: Vec<(Particle, f64)> = input.into_iter().map(step).collect();
    assert_eq!(got, want);
    // Small and signed numbers, in chunks of every size.
    let small = pool
        .map_chunksize(|x: i8| x.wrapping_mul(3), -128..=127i8, 7)
        .unwrap();
    assert_eq!(
        small,
        (-128..=127i8)
            .map(|x| x.wrapping_mul(3))
            .collect::<Vec<_>>()
    );
}

/// One value whose encoding changes layout with the value: a tag, then a pair of numbers
/// (plain data) or text (not), to mix plain and postcard items within one chunk and within
/// one run of results.
#[derive(Debug, Clone, PartialEq)]
enum Mixed {
    Pair(u32, u32),
    Text(String),
}

impl serde::Serialize for Mixed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(2)?;
        match self {
            Mixed::Pair(a, b) => {
                t.serialize_element(&0u8)?;
                t.serialize_element(&(a, b))?;
            }
            Mixed::Text(x) => {
                t.serialize_element(&1u8)?;
                t.serialize_element(x)?;
            }
        }
        t.end()
    }
}

impl<'de> serde::Deserialize<'de> for Mixed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tagged;
        impl<'de> serde::de::Visitor<'de> for Tagged {
            type Value = Mixed;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tag, then a pair or text")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Mixed, A::Error> {
                let missing = || serde::de::Error::custom("missing element");
                let tag: u8 = a.next_element()?.ok_or_else(missing)?;
                Ok(match tag {
                    0 => {
                        let (x, y): (u32, u32) = a.next_element()?.ok_or_else(missing)?;
                        Mixed::Pair(x, y)
                    }
                    _ => Mixed::Text(a.next_element()?.ok_or_else(missing)?),
                })
            }
        }
        d.deserialize_tuple(2, Tagged)
    }
}

fn mixed(i: u64) -> Mixed {
    match i % 5 {
        0..=2 => Mixed::Pair(i as u32, 1),
        3 => Mixed::Pair(7, i as u32),
        _ => Mixed::Text(format!("item {i}")),
    }
}

fn describe(m: Mixed) -> Mixed {
    match m {
        Mixed::Pair(a, b) if a % 7 == 0 => Mixed::Text(format!("{a}/{b}")),
        Mixed::Pair(a, b) => Mixed::Pair(b, a),
        Mixed::Text(t) => Mixed::Text(t.to_uppercase()),
    }
}

fn double_or_name(x: u64) -> Mixed {
    if x % 1000 == 999 {
        Mixed::Text(format!("n{x}"))
    } else {
        Mixed::Pair(x as u32, 2 * x as u32)
    }
}

#[test]
fn items_whose_layout_changes_mid_chunk_still_round_trip() {
    let pool = Pool::new(2).unwrap();
    // Arguments: plain for a few items, then not (the chunk is re-encoded).
    let input: Vec<Mixed> = (0..3000).map(mixed).collect();
    let want: Vec<Mixed> = input.iter().cloned().map(describe).collect();
    assert_eq!(pool.map(describe, input.clone()).unwrap(), want);
    assert_eq!(pool.map_chunksize(describe, input, 1).unwrap(), want);
    // Results: plain for long runs, then one of another layout now and then.
    let got = pool.map(double_or_name, 0..10_000u64).unwrap();
    let want: Vec<Mixed> = (0..10_000u64).map(double_or_name).collect();
    assert_eq!(got, want);
}

fn panics_on_a_plain_multiple_of_1000(x: u64) -> (u64, bool) {
    assert!(x % 1000 != 500, "bad {x}");
    (x, x % 2 == 0)
}

#[test]
fn a_panic_inside_a_plain_run_fails_that_task_alone() {
    let pool = Pool::new(2).unwrap();
    let results = pool.map_results(panics_on_a_plain_multiple_of_1000, 0..5000u64);
    for (i, r) in results.into_iter().enumerate() {
        let i = i as u64;
        match r {
            Ok(v) => assert_eq!(v, (i, i % 2 == 0)),
            Err(e) => {
                assert_eq!(i % 1000, 500, "{e}");
                assert!(e.is_panic() && e.index() == Some(i), "{e}");
            }
        }
    }
}

fn put_square((q, x): (gpuproc::channel::Queue<u64>, u64)) -> u64 {
    q.put(x * x).unwrap();
    x
}

fn add_under_lock(
    (lock, total, x): (gpuproc::sync::Lock, gpuproc::shm::SharedValue<u64>, u64),
) -> u64 {
    let _g = lock.lock_timeout(TIMEOUT).unwrap().expect("lock in time");
    let before = total.get();
    total.set(before + x);
    before
}

#[test]
fn queues_locks_and_shared_values_travel_in_pool_tasks() {
    for m in StartMethod::all() {
        let pool = two_workers(m).build().unwrap();
        // A map whose every argument carries a queue (descriptors, so not plain data).
        let q = gpuproc::channel::Queue::<u64>::new().unwrap();
        let got = pool
            .map(put_square, (0..50u64).map(|x| (q.clone(), x)))
            .unwrap();
        assert_eq!(got, (0..50).collect::<Vec<u64>>(), "{m:?}");
        let mut squares: Vec<u64> = (0..50).map(|_| q.get_timeout(TIMEOUT).unwrap()).collect();
        squares.sort_unstable();
        assert_eq!(
            squares,
            (0..50u64).map(|x| x * x).collect::<Vec<_>>(),
            "{m:?}"
        );
        // apply_async with a lock and a shared value: every addition lands exactly once.
        let lock = gpuproc::sync::Lock::new().unwrap();
        let total = gpuproc::shm::SharedValue::new(0u64).unwrap();
        let handles: Vec<_> = (1..=40u64)
            .map(|x| {
                pool.apply_async(add_under_lock, (lock.clone(), total.clone(), x))
                    .unwrap()
            })
            .collect();
        for mut h in handles {
            h.get_timeout(TIMEOUT).unwrap();
        }
        assert_eq!(total.get(), 40 * 41 / 2, "{m:?}");
    }
}

/// For an even `x`, one end of a new pipe with `x` waiting in it; for an odd one, nothing.
fn pipe_with_greeting(x: u64) -> Option<gpuproc::channel::Connection> {
    if x % 2 == 1 {
        return None;
    }
    let (ours, theirs) = gpuproc::channel::Pipe::new().unwrap();
    ours.send(&x).unwrap();
    Some(theirs)
}

#[test]
fn results_can_carry_handles_among_results_that_do_not() {
    let pool = Pool::new(2).unwrap();
    // Chunks where the first results carry no descriptor and later ones do, and the
    // reverse; and one task at a time.
    for chunksize in [1, 3, 8] {
        let got = pool
            .map_chunksize(pipe_with_greeting, 1..17u64, chunksize)
            .unwrap();
        for (x, conn) in (1..17u64).zip(got) {
            match conn {
                None => assert_eq!(x % 2, 1),
                Some(conn) => assert_eq!(conn.recv_timeout::<u64>(TIMEOUT).unwrap(), x),
            }
        }
    }
}

/// What the initializer below hands each worker: a queue to report on.
static REPORT: std::sync::OnceLock<gpuproc::channel::Queue<u32>> = std::sync::OnceLock::new();

fn keep_report_queue(q: gpuproc::channel::Queue<u32>) {
    q.put(std::process::id()).unwrap();
    let _ = REPORT.set(q);
}

fn report_pid(x: u64) -> u64 {
    REPORT
        .get()
        .expect("the initializer ran")
        .put(std::process::id())
        .unwrap();
    x
}

#[test]
fn initializer_arguments_can_hold_handles_for_every_worker_and_replacement() {
    for m in StartMethod::all() {
        let q = gpuproc::channel::Queue::<u32>::new().unwrap();
        // One task per worker life: every task runs in a fresh (replacement) worker, whose
        // initializer must have received the queue too.
        let pool = two_workers(m)
            .max_tasks_per_child(1)
            .initializer(keep_report_queue, q.clone())
            .build()
            .unwrap();
        let got = pool.map_chunksize(report_pid, 0..6u64, 1).unwrap();
        assert_eq!(got, (0..6).collect::<Vec<u64>>(), "{m:?}");
        pool.close();
        pool.join().unwrap();
        // Each task's worker reported twice: once from its initializer, once from the task.
        let mut reports = Vec::new();
        while let Ok(pid) = q.try_get() {
            reports.push(pid);
        }
        let task_pids: std::collections::BTreeSet<u32> = reports.iter().copied().collect();
        assert!(task_pids.len() >= 6, "{m:?}: {reports:?}");
        for pid in &task_pids {
            let n = reports.iter().filter(|p| *p == pid).count();
            assert!(n == 1 || n == 2, "{m:?}: {pid} reported {n} times");
        }
        assert!(reports.len() >= 12, "{m:?}: {reports:?}");
    }
}

fn broken_init(code: u32) {
    panic!("initializer refuses to start ({code})");
}

#[test]
fn a_failing_initializer_fails_the_tasks_instead_of_restarting_workers_for_ever() {
    for m in StartMethod::all() {
        let pool = two_workers(m).initializer(broken_init, 7).build().unwrap();
        let t0 = Instant::now();
        let results = pool.map_results(square, 0..20u64);
        assert!(t0.elapsed() < TIMEOUT, "{m:?}");
        assert_eq!(results.len(), 20);
        for (i, r) in results.into_iter().enumerate() {
            let e = r.unwrap_err();
            assert!(e.is_initializer_failed(), "{m:?}: {e}");
            assert_eq!(e.index(), Some(i as u64));
            assert!(
                e.to_string().contains("initializer refuses to start (7)"),
                "{e}"
            );
        }
        // Later work fails the same way, at once; closing and joining still work.
        let e = pool.apply(square, 3).unwrap_err();
        assert!(e.is_initializer_failed(), "{m:?}: {e}");
        assert!(pool.worker_pids().is_empty(), "{m:?}");
        pool.close();
        pool.join().unwrap();
    }
}

fn sum_bytes(b: gpuproc::channel::Bytes) -> (usize, u64) {
    (b.len(), b.iter().map(|&x| u64::from(x)).sum())
}

#[test]
fn large_arguments_split_big_chunks_and_arrive_whole() {
    let pool = Pool::new(2).unwrap();
    // Nine 8 MiB items asked for in one chunk: more than a chunk may hold, so it is cut.
    let items: Vec<gpuproc::channel::Bytes> = (0..9u8)
        .map(|i| gpuproc::channel::Bytes(vec![i; 8 << 20]))
        .collect();
    let got = pool.map_chunksize(sum_bytes, items, 9).unwrap();
    let want: Vec<(usize, u64)> = (0..9u64).map(|i| (8 << 20, i * (8 << 20))).collect();
    assert_eq!(got, want);
}

/// Runs `f` on another thread and returns what it returns, failing the test if that takes
/// longer than [`TIMEOUT`] (for calls that have no timeout of their own, such as `map`).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(TIMEOUT)
        .expect("the call returned within the timeout (and did not panic)")
}

#[test]
fn zero_workers_or_zero_tasks_per_child_is_an_error_as_in_python() {
    let err = Pool::new(0).unwrap_err();
    assert!(err.is_invalid(), "{err:?}");
    assert!(err.to_string().contains("processes(0)"), "{err}");
    assert!(err.to_string().contains("at least 1 worker"), "{err}");
    let err = Pool::builder().processes(0).build().unwrap_err();
    assert!(err.is_invalid(), "{err:?}");
    let err = Pool::builder()
        .processes(1)
        .max_tasks_per_child(0)
        .build()
        .unwrap_err();
    assert!(err.is_invalid(), "{err:?}");
    assert!(err.to_string().contains("max_tasks_per_child(0)"), "{err}");
    // The last value set counts.
    let pool = Pool::builder().processes(0).processes(1).build().unwrap();
    assert_eq!(pool.processes(), 1);
}

#[test]
fn huge_timeouts_mean_none_in_the_pool() {
    let pool = Arc::new(
        Pool::builder()
            .processes(2)
            .task_timeout(Duration::MAX)
            .gpu_sampling(Duration::MAX)
            .build()
            .unwrap(),
    );
    let p = pool.clone();
    let got = within(move || p.map(square, 0..100u64).unwrap());
    assert_eq!(got, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    let mut r = pool.apply_async(square, 7).unwrap();
    assert_eq!(r.get_timeout(Duration::MAX).unwrap(), 49);
    let mut r = pool.apply_async(square, 8).unwrap();
    assert!(r.wait_timeout(Duration::MAX));
    assert_eq!(r.get_timeout(TIMEOUT).unwrap(), 64);
}

#[test]
fn a_dead_driver_fails_pending_and_later_tasks_instead_of_hanging() {
    let pool = Arc::new(Pool::new(2).unwrap());
    let pids = pool.worker_pids();
    assert_eq!(pool.apply(square, 3).unwrap(), 9);
    // Tasks queued and running when the driver dies.
    let mut running = pool.apply_async(block, 0).unwrap();
    let p = pool.clone();
    let imap = std::thread::spawn(move || {
        let mut it = p.imap(block, 0..10u64);
        let first = it.next();
        (first, it.next())
    });
    let p = pool.clone();
    let map = std::thread::spawn(move || p.map(block, 0..10u64));
    let p = pool.clone();
    let waiting = std::thread::spawn(move || {
        let mut it = p.imap(block, 0u64..);
        let got: Vec<_> = it.by_ref().take(3).collect();
        (got, it.next().is_none())
    });
    // (Each fails at once if the driver died before it submitted; else while it waits.)
    pool.__panic_driver_for_tests();
    let err = running.get_timeout(TIMEOUT).unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    assert!(
        err.to_string().contains("a fault injected for tests"),
        "{err}"
    );
    let (first, second) = within(move || imap.join().unwrap());
    let err = first.unwrap().unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    assert!(second.is_none(), "an imap ends after its driver died");
    let err = within(move || map.join().unwrap()).unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    let (got, ended) = within(move || waiting.join().unwrap());
    assert!(ended);
    assert!(
        got.iter()
            .any(|r| r.as_ref().is_err_and(PoolError::is_driver_died)),
        "{got:?}"
    );
    // Later tasks fail at once.
    let err = pool.apply_async(square, 1).unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    let p = pool.clone();
    let err = within(move || p.map(square, 0..10u64)).unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    let p = pool.clone();
    let r = within(move || p.imap(square, 0..10u64).collect::<Vec<_>>());
    assert_eq!(r.len(), 1, "one error, then the end: {r:?}");
    let p = pool.clone();
    let err = within(move || p.join()).unwrap_err();
    assert!(err.is_driver_died(), "{err:?}");
    // The workers went with the driver.
    let left = support::wait_all_ended(&pids, Instant::now() + TIMEOUT);
    assert!(
        left.is_empty(),
        "workers left after the driver died: {left:?}"
    );
}

#[test]
fn a_fork_pool_is_refused_in_a_multi_threaded_process_unless_allowed() {
    // libtest runs this test on a thread of its own: the process has at least two.
    let err = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Fork)
        .build()
        .unwrap_err();
    assert!(err.is_fork_unsafe(), "{err:?}");
    assert!(
        err.to_string()
            .contains("PoolBuilder::allow_fork_with_threads(true)"),
        "{err}"
    );
    // Other start methods are not concerned.
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Spawn)
        .build()
        .unwrap();
    assert_eq!(pool.apply(square, 3).unwrap(), 9);
    // Allowed explicitly: workers fork, and so do their replacements.
    let pool = Arc::new(
        Pool::builder()
            .processes(2)
            .start_method(StartMethod::Fork)
            .allow_fork_with_threads(true)
            .max_tasks_per_child(5)
            .build()
            .unwrap(),
    );
    let p = pool.clone();
    let got = within(move || p.map(square, 0..40u64).unwrap());
    assert_eq!(got, (0..40u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn a_worker_that_never_starts_its_task_is_cut_by_the_task_timeout() {
    let pool = Arc::new(
        Pool::builder()
            .processes(1)
            .task_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    // The worker is up and has run a task; then it hangs (stopped, as a worker deadlocked on a
    // lock would be) before it can start the next.
    assert_eq!(pool.apply(square, 2).unwrap(), 4);
    let pid = pool.worker_pids()[0];
    // SAFETY: a plain system call on our pool's worker.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let mut hung = pool.apply_async(square, 3).unwrap();
    let err = hung.get_timeout(TIMEOUT).unwrap_err();
    assert!(err.is_task_timeout(), "{err:?}");
    assert_eq!(err.index(), Some(0));
    let left = support::wait_all_ended(&[pid], Instant::now() + TIMEOUT);
    assert!(left.is_empty(), "the hung worker was killed");
    let p = pool.clone();
    assert_eq!(within(move || p.apply(square, 4).unwrap()), 16);
    assert_ne!(pool.worker_pids(), [pid]);
}

#[test]
fn a_huge_chunk_size_is_one_chunk_not_an_overflow() {
    let pool = Arc::new(Pool::new(2).unwrap());
    let p = pool.clone();
    let (mapped, imapped) = within(move || {
        let mapped = p.map_chunksize(square, 0..100u64, usize::MAX).unwrap();
        let imapped: Vec<u64> = p
            .imap(square, 0..100u64)
            .chunksize(usize::MAX)
            .map(Result::unwrap)
            .collect();
        (mapped, imapped)
    });
    let squares: Vec<u64> = (0..100u64).map(|x| x * x).collect();
    assert_eq!(mapped, squares);
    assert_eq!(imapped, squares);
}

#[test]
fn a_task_function_in_another_shared_object_is_refused() {
    // A function of the C library typed as a task; never called: the refusal comes first.
    // SAFETY: only the address is used (compared with the loaded objects' ranges); the
    // pointer is never called through this type.
    let foreign: fn(i32) -> i32 =
        unsafe { std::mem::transmute::<*const (), fn(i32) -> i32>(libc::abs as *const ()) };
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let pool = Pool::builder()
            .processes(1)
            .start_method(m)
            .build()
            .unwrap();
        for err in [
            pool.map(foreign, [-1, -2]).unwrap_err(),
            pool.apply_async(foreign, -3).err().unwrap(),
            pool.imap(foreign, [-4]).next().unwrap().unwrap_err(),
        ] {
            assert!(
                matches!(err, PoolError::ForeignTarget { .. }),
                "{m:?}: {err}"
            );
            assert!(err.to_string().contains("another loaded object"), "{err}");
        }
        // The pool itself is fine: a function of the executable still runs.
        assert_eq!(pool.map(square, [3u64]).unwrap(), [9]);
        // SAFETY: as above; an initializer is checked when the pool is built.
        let init: fn(i32) =
            unsafe { std::mem::transmute::<*const (), fn(i32)>(libc::abs as *const ()) };
        let built = Pool::builder()
            .processes(1)
            .start_method(m)
            .initializer(init, 1)
            .build();
        assert!(
            matches!(built, Err(PoolError::ForeignTarget { .. })),
            "{m:?}"
        );
    }
}

fn pid_and_sum(v: Vec<f32>) -> (u32, f64) {
    (std::process::id(), v.iter().map(|&x| f64::from(x)).sum())
}

#[test]
fn the_automatic_chunk_size_sends_large_items_one_per_chunk() {
    let (chunks, got) = within(|| {
        let pool = Pool::new(2).unwrap();
        // Sixteen 4 MiB items: Python's count alone makes chunks of 2 (8 chunks); the byte
        // budget makes each item its own chunk, so both workers get work from the start.
        let items: Vec<Vec<f32>> = (0..16u16)
            .map(|i| vec![f32::from(i); (4 << 20) / 4])
            .collect();
        let before = pool.__chunks_sent_for_tests();
        let got = pool.map(pid_and_sum, items).unwrap();
        let chunks = pool.__chunks_sent_for_tests() - before;
        pool.close();
        pool.join().unwrap();
        (chunks, got)
    });
    let floats = f64::from((4u32 << 20) / 4);
    let sums: Vec<f64> = got.iter().map(|r| r.1).collect();
    let want: Vec<f64> = (0..16u16).map(|i| f64::from(i) * floats).collect();
    assert_eq!(sums, want);
    assert_eq!(chunks, 16, "one chunk per 4 MiB item");
    let mut pids: Vec<u32> = got.iter().map(|r| r.0).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 2, "both workers ran tasks: {pids:?}");
}

#[test]
fn the_automatic_chunk_size_keeps_pythons_count_for_small_items() {
    let chunks = within(|| {
        let pool = Pool::new(2).unwrap();
        let before = pool.__chunks_sent_for_tests();
        // 100,000 u64: Python's ceil(100000 / 8) = 12,500 per chunk, 8 chunks.
        let got = pool.map(square, 0..100_000u64).unwrap();
        assert_eq!(got[99_999], 99_999 * 99_999);
        let chunks = pool.__chunks_sent_for_tests() - before;
        pool.close();
        pool.join().unwrap();
        chunks
    });
    assert_eq!(chunks, 8);
}

/// A result that encodes but that the parent refuses to decode when it says "7".
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(try_from = "String", into = "String")]
struct Picky(String);

impl TryFrom<String> for Picky {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "7" {
            Err("seven is refused here".into())
        } else {
            Ok(Picky(s))
        }
    }
}

impl From<Picky> for String {
    fn from(p: Picky) -> String {
        p.0
    }
}

fn picky(i: u64) -> Picky {
    Picky(i.to_string())
}

#[test]
fn a_result_that_does_not_decode_fails_its_own_task_with_the_decoders_reason() {
    let pool = Pool::new(2).unwrap();
    // map stops at that task and says which and why.
    let err = pool.map(picky, 0..20u64).unwrap_err();
    assert_eq!(err.index(), Some(7), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("task 7: the result (`") && shown.contains("seven is refused here"),
        "{shown}"
    );
    // imap yields every other result.
    let got: Vec<Result<Picky, String>> = pool
        .imap(picky, 0..20u64)
        .map(|r| r.map_err(|e| e.to_string()))
        .collect();
    for (i, r) in got.iter().enumerate() {
        match r {
            Ok(p) => assert!(i != 7 && p.0 == i.to_string(), "task {i}: {p:?}"),
            Err(e) => assert!(
                i == 7 && e.contains("seven is refused here"),
                "task {i}: {e}"
            ),
        }
    }
    pool.close();
    pool.join().unwrap();
}

/// An argument whose `Serialize` refuses, saying why.
#[derive(Debug, serde::Deserialize)]
struct Unsendable(u64);

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 3 {
            return Err(serde::ser::Error::custom("number 3 is not for sending"));
        }
        s.serialize_u64(self.0)
    }
}

fn unsendable(u: Unsendable) -> String {
    u.0.to_string()
}

#[test]
fn an_argument_that_does_not_encode_fails_with_the_types_own_reason() {
    let pool = Pool::new(2).unwrap();
    let err = pool.map(unsendable, (0..6).map(Unsendable)).unwrap_err();
    assert_eq!(err.index(), Some(3), "{err}");
    assert!(
        err.to_string().contains("number 3 is not for sending"),
        "{err}"
    );
    pool.close();
    pool.join().unwrap();
}
