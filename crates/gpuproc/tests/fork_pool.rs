//! A `Fork` pool in a program that is single-threaded when it builds the pool, then starts a
//! thread: the pool forks beside its own driver thread, refuses to fork beside the program's
//! thread (failing the work it cannot run instead of hanging), and forks again once that
//! thread has ended.
//!
//! This test target has no libtest harness, so that the process has only the threads it
//! starts itself. An alarm bounds every blocking call (a watchdog thread would be a thread).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use gpuproc::{Pool, PoolError, StartMethod};

fn square(x: u64) -> u64 {
    x * x
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits until this process has `n` threads (a joined thread leaves the list a moment
/// after `join` returns).
fn until_threads(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while threads() != n {
        assert!(Instant::now() < deadline, "{} threads, not {n}", threads());
        std::thread::yield_now();
    }
}

fn main() {
    // SAFETY: a plain system call; SIGALRM's default action ends the process if it hangs.
    unsafe { libc::alarm(120) };
    assert_eq!(threads(), 1);
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Fork)
        .max_tasks_per_child(2)
        .build()
        .unwrap();
    // Replacements (every 2 tasks) fork from the pool's driver thread: allowed. The last
    // worker has run one task of its two.
    let got = pool.map(square, 0..9u64).unwrap();
    assert_eq!(got, (0..9u64).map(|x| x * x).collect::<Vec<_>>());

    // The program starts a thread: new Fork pools are refused, and so are replacements.
    let (release, wait) = mpsc::channel::<()>();
    let other = std::thread::spawn(move || wait.recv().ok());
    let err = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Fork)
        .build()
        .unwrap_err();
    assert!(err.is_fork_unsafe(), "{err}");
    let results = pool.map_results(square, 1..5u64);
    assert_eq!(*results[0].as_ref().unwrap(), 1);
    for r in &results[1..] {
        match r {
            Err(PoolError::NoWorker { reason, .. }) => {
                assert!(reason.contains("refusing to fork"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
    // Later work fails at once too (it does not wait for a worker that will never come).
    let err = pool.map(square, 0..4u64).unwrap_err();
    assert!(matches!(err, PoolError::NoWorker { index: 0, .. }), "{err}");

    // Once the thread has ended, the pool forks again.
    release.send(()).unwrap();
    other.join().unwrap();
    until_threads(2);
    assert_eq!(pool.map(square, 0..4u64).unwrap(), [0, 1, 4, 9]);
    pool.close();
    pool.join().unwrap();
    println!("fork_pool: 1 passed, 0 failed");
}
