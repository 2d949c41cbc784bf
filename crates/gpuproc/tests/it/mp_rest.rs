//! The rest of Python's `multiprocessing`, ported from CPython's
//! `Lib/test/_test_multiprocessing.py`: pool callbacks (`test_map_async_callbacks`,
//! `test_async_error_callback`), `map_async`/`starmap_async`.

use std::sync::mpsc;
use std::thread::ThreadId;
use std::time::Duration;

use gpuproc::pool::Callbacks;
use gpuproc::sync::Event;
use gpuproc::{Pool, PoolError, StartMethod};

use crate::support::TIMEOUT;

fn parse(s: String) -> i64 {
    s.parse().expect("a number")
}

fn square(x: u64) -> u64 {
    x * x
}

fn pair_sum((a, b): (u64, u64)) -> u64 {
    a + b
}

/// Waits until `go` is set, then returns `i`.
fn wait_then((i, go): (u64, Event)) -> u64 {
    assert!(go.wait_timeout(TIMEOUT), "task {i} was never released");
    i
}

fn pool(n: usize) -> Pool {
    Pool::builder()
        .processes(n)
        .start_method(StartMethod::Spawn)
        .build()
        .unwrap()
}

/// What a callback saw.
#[derive(Debug)]
enum Seen {
    Ok(Vec<i64>),
    Err(bool),
}

/// CPython's `test_map_async_callbacks`: the callback gets the results, the error callback
/// the error.
#[test]
fn map_async_callbacks() {
    let pool = pool(2);
    let (tx, rx) = mpsc::channel();
    let (tx2, tx3) = (tx.clone(), tx.clone());
    let mut r = pool
        .map_async_with(
            parse,
            vec!["1".to_string()],
            Callbacks::new()
                .callback(move |v: &Vec<i64>| tx.send(Seen::Ok(v.clone())).unwrap())
                .error_callback(move |e| tx2.send(Seen::Err(e.is_panic())).unwrap()),
        )
        .unwrap();
    assert!(r.wait_timeout(TIMEOUT));
    // The callback ran before the result became ready.
    assert!(matches!(rx.try_recv(), Ok(Seen::Ok(v)) if v == [1]));
    assert_eq!(r.get_timeout(TIMEOUT).unwrap(), [1]);

    let tx4 = tx3.clone();
    let mut r = pool
        .map_async_with(
            parse,
            vec!["a".to_string()],
            Callbacks::new()
                .callback(move |v: &Vec<i64>| tx3.send(Seen::Ok(v.clone())).unwrap())
                .error_callback(move |e| tx4.send(Seen::Err(e.is_panic())).unwrap()),
        )
        .unwrap();
    assert!(r.wait_timeout(TIMEOUT));
    assert!(matches!(rx.try_recv(), Ok(Seen::Err(true))));
    assert!(r.get_timeout(TIMEOUT).unwrap_err().is_panic());
}

/// CPython's `test_map_async` and `test_starmap_async`, and an empty input.
#[test]
fn map_async_and_starmap_async() {
    let pool = pool(2);
    let mut r = pool.map_async(square, 0..1000u64).unwrap();
    assert_eq!(
        r.get_timeout(TIMEOUT).unwrap(),
        (0..1000u64).map(|x| x * x).collect::<Vec<_>>()
    );
    assert!(matches!(
        r.get_timeout(TIMEOUT),
        Err(PoolError::AlreadyTaken)
    ));
    let mut r = pool
        .starmap_async(pair_sum, (0..10u64).map(|i| (i, i)))
        .unwrap();
    assert_eq!(r.get_timeout(TIMEOUT).unwrap()[9], 18);
    let mut r = pool.map_async(square, Vec::<u64>::new()).unwrap();
    assert!(r.get_timeout(TIMEOUT).unwrap().is_empty());
    pool.close();
    pool.join().unwrap();
}

/// Callbacks run on one thread of the pool, not the caller's, in the order the tasks
/// complete (not the order they were submitted); CPython's `test_async` and the pool's
/// result handler.
#[test]
fn callbacks_run_on_one_pool_thread_in_completion_order() {
    let pool = pool(3);
    let events: Vec<Event> = (0..3).map(|_| Event::new().unwrap()).collect();
    let (tx, rx) = mpsc::channel::<(u64, ThreadId)>();
    let mut results = Vec::new();
    for (i, go) in events.iter().enumerate() {
        let tx = tx.clone();
        results.push(
            pool.apply_async_with(
                wait_then,
                (i as u64, go.clone()),
                Callbacks::new()
                    .callback(move |r: &u64| tx.send((*r, std::thread::current().id())).unwrap()),
            )
            .unwrap(),
        );
    }
    let mut order = Vec::new();
    let mut threads = Vec::new();
    for i in [2, 0, 1] {
        events[i].set();
        let (r, t) = rx.recv_timeout(TIMEOUT).expect("the callback ran");
        order.push(r);
        threads.push(t);
    }
    assert_eq!(order, [2, 0, 1]);
    assert!(threads.iter().all(|t| *t == threads[0]));
    assert_ne!(threads[0], std::thread::current().id());
    for (i, mut r) in results.into_iter().enumerate() {
        assert_eq!(r.get_timeout(TIMEOUT).unwrap(), i as u64);
    }
}

/// A panicking callback is reported and the pool goes on: its result still arrives, later
/// callbacks still run, and `join` waits for every callback (Python's `join` waits for the
/// result handler).
#[test]
fn a_panicking_callback_does_not_end_the_pool() {
    let pool = pool(2);
    let mut bad = pool
        .apply_async_with(
            square,
            3,
            Callbacks::new().callback(|_: &u64| panic!("callback fails on purpose")),
        )
        .unwrap();
    assert_eq!(bad.get_timeout(TIMEOUT).unwrap(), 9);
    let (tx, rx) = mpsc::channel();
    let mut pending = Vec::new();
    for i in 0..20u64 {
        let tx = tx.clone();
        pending.push(
            pool.apply_async_with(
                square,
                i,
                Callbacks::new().callback(move |r: &u64| tx.send(*r).unwrap()),
            )
            .unwrap(),
        );
    }
    drop(tx);
    pool.close();
    pool.join().unwrap();
    let mut seen: Vec<u64> = rx.try_iter().collect();
    seen.sort();
    assert_eq!(seen, (0..20u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(pending.iter_mut().all(|r| r.ready()));
}

/// CPython's `test_async_error_callback`: an error reaches the error callback only.
#[test]
fn apply_async_error_callback() {
    let pool = pool(1);
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let mut r = pool
        .apply_async_with(
            parse,
            "x".to_string(),
            Callbacks::new()
                .callback(move |_: &i64| tx.send(false).unwrap())
                .error_callback(move |e| tx2.send(e.is_panic()).unwrap()),
        )
        .unwrap();
    assert!(r.get_timeout(TIMEOUT).unwrap_err().is_panic());
    assert!(rx.recv_timeout(Duration::from_secs(0)).unwrap());
    assert!(rx.try_recv().is_err());
}
