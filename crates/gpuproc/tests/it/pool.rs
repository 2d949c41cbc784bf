//! `Pool`: results, laziness, and faults (dead workers, panics, timeouts, termination).

use std::sync::atomic::{AtomicU64, Ordering};
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

#[test]
fn map_with_every_start_method() {
    for m in StartMethod::all() {
        let pool = Pool::builder()
            .processes(2)
            .start_method(m)
            .build()
            .unwrap();
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
