//! The rest of Python's `multiprocessing`, ported from CPython's
//! `Lib/test/_test_multiprocessing.py`: pool callbacks (`test_map_async_callbacks`,
//! `test_async_error_callback`), `map_async`/`starmap_async`, and `ThreadPool` (`_TestPool`
//! with threads), `ShareableList` and the resource tracker (`_TestSharedMemory`), managers (`_TestContainers`).

use std::sync::{mpsc, Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use gpuproc::managers::{ManagedDict, ManagedList, ManagedNamespace, ManagedValue, Manager};
use gpuproc::pool::{Callbacks, ThreadPool};
use gpuproc::shm::{Item, ShareableList, SharedMemory};
use gpuproc::sync::Event;
use gpuproc::{Pool, PoolError, Queue, StartMethod};

use crate::support::{self, TIMEOUT};

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

// ---- ThreadPool: CPython's `_TestPool` run with `TYPE = 'threads'` ----

/// CPython's `test_map`, `test_starmap`, `test_apply`, `test_imap`, `test_imap_unordered`
/// and `test_empty_iterable` on a `ThreadPool`, with closures.
#[test]
fn thread_pool_maps() {
    let pool = ThreadPool::new(4).unwrap();
    let k = 3u64;
    let want: Vec<u64> = (0..100u64).map(|x| x * k).collect();
    assert_eq!(pool.map(move |x: u64| x * k, 0..100u64).unwrap(), want);
    assert_eq!(
        pool.starmap(|(a, b): (u64, u64)| a * b, (0..100u64).map(|x| (x, 3)))
            .unwrap(),
        want
    );
    assert_eq!(
        pool.apply(|s: String| s.len(), "four".to_string()).unwrap(),
        4
    );
    let got: Vec<u64> = pool
        .imap(move |x: u64| x * k, 0..100u64)
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, want);
    let got: Vec<u64> = pool
        .imap(move |x: u64| x * k, 0..100u64)
        .chunksize(7)
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, want);
    let mut got: Vec<u64> = pool
        .imap_unordered(move |x: u64| x * k, 0..100u64)
        .chunksize(5)
        .map(Result::unwrap)
        .collect();
    got.sort();
    assert_eq!(got, want);
    // An endless input is taken lazily.
    let first: Vec<u64> = pool
        .imap(|x: u64| x + 1, 0u64..)
        .take(10)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first, (1..=10).collect::<Vec<u64>>());
    assert!(pool.map(|x: u64| x, Vec::new()).unwrap().is_empty());
    assert_eq!(pool.imap(|x: u64| x, Vec::new()).count(), 0);
    let mut r = pool.map_async(|x: u64| x * 2, 0..10u64).unwrap();
    assert_eq!(r.get_timeout(TIMEOUT).unwrap()[9], 18);
    assert!(matches!(
        ThreadPool::new(0),
        Err(PoolError::InvalidArgument { .. })
    ));
    pool.close();
    pool.join();
    assert!(matches!(pool.apply(|x: u8| x, 1), Err(PoolError::Closed)));
}

/// A panicking task fails alone, with its index; the others go on (CPython's
/// `test_imap_handle_iterable_exception` idea, for task errors).
#[test]
fn thread_pool_task_panics_fail_alone() {
    let pool = ThreadPool::new(2).unwrap();
    let out: Vec<Result<u64, PoolError>> = pool
        .imap(
            |x: u64| {
                if x == 5 {
                    panic!("five fails on purpose");
                }
                x
            },
            0..10u64,
        )
        .collect();
    assert_eq!(out.len(), 10);
    let e = out[5].as_ref().unwrap_err();
    assert!(e.is_panic() && e.index() == Some(5), "{e}");
    assert!(out.iter().enumerate().all(|(i, r)| i == 5 || r.is_ok()));
    let e = pool.map(|x: u64| 10 / x, [1, 0, 2]).unwrap_err();
    assert_eq!(e.index(), Some(1));
}

/// CPython's `test_terminate`: queued tasks are dropped with `Terminated`; a running one
/// is waited for.
#[test]
fn thread_pool_terminate_drops_queued_tasks() {
    let pool = Arc::new(ThreadPool::new(1).unwrap());
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let started_tx = Mutex::new(started_tx);
    let mut running = pool
        .apply_async(
            move |x: u64| {
                started_tx.lock().unwrap().send(()).unwrap();
                go_rx.lock().unwrap().recv_timeout(TIMEOUT).unwrap();
                x
            },
            7,
        )
        .unwrap();
    started_rx.recv_timeout(TIMEOUT).unwrap();
    let mut queued: Vec<_> = (0..5u64)
        .map(|i| pool.apply_async(|x: u64| x, i).unwrap())
        .collect();
    let terminator = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.terminate())
    };
    for r in &mut queued {
        assert!(r.get_timeout(TIMEOUT).unwrap_err().is_terminated());
    }
    go_tx.send(()).unwrap();
    terminator.join().unwrap();
    assert_eq!(running.get_timeout(TIMEOUT).unwrap(), 7);
}

/// Callbacks of a `ThreadPool` run on its callback thread, not the caller's nor a worker's.
#[test]
fn thread_pool_callbacks_run_on_the_callback_thread() {
    let pool = ThreadPool::new(2).unwrap();
    let (tx, rx) = mpsc::channel();
    let (tx2, tx3) = (tx.clone(), tx.clone());
    let mut r = pool
        .apply_async_with(
            |_: u8| std::thread::current().id(),
            0,
            Callbacks::new().callback(move |worker: &ThreadId| {
                tx.send((*worker, std::thread::current().id())).unwrap()
            }),
        )
        .unwrap();
    let worker = r.get_timeout(TIMEOUT).unwrap();
    let (w, cb) = rx.recv_timeout(Duration::ZERO).unwrap();
    assert_eq!(w, worker);
    assert_ne!(cb, worker);
    assert_ne!(cb, std::thread::current().id());
    let _r = pool
        .map_async_with(
            |x: u64| 10 / x,
            [1, 0],
            Callbacks::new()
                .callback(move |_| drop(tx2))
                .error_callback(move |e| {
                    tx3.send((std::thread::current().id(), std::thread::current().id()))
                        .unwrap();
                    assert_eq!(e.index(), Some(1));
                }),
        )
        .unwrap();
    let (t, _) = rx.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(t, cb);
    pool.join();
}

// ---- ShareableList: CPython's `_TestSharedMemory.test_shared_memory_ShareableList_*` ----

/// In another process: attaches the list by name, checks what the parent wrote, and writes
/// back.
fn edit_list(name: String) -> Result<Vec<Item>, String> {
    let list = ShareableList::attach(&name).map_err(|e| e.to_string())?;
    let seen = list.to_vec().map_err(|e| e.to_string())?;
    list.set(0, 43i64).map_err(|e| e.to_string())?;
    list.set(1, "changed").map_err(|e| e.to_string())?;
    list.set(5, &b"\x00\xff"[..]).map_err(|e| e.to_string())?;
    list.set(4, false).map_err(|e| e.to_string())?;
    // Type and size are fixed at creation.
    let wrong = list.set(2, "x").unwrap_err();
    let long = list.set(1, "much longer than sixteen bytes").unwrap_err();
    if !wrong.is_wrong_type() || !long.is_too_long() {
        return Err(format!("{wrong} / {long}"));
    }
    Ok(seen)
}

/// Gets a list as an argument (the block travels as a descriptor).
fn sum_ints(list: ShareableList) -> i64 {
    (0..list.len())
        .filter_map(|i| match list.get(i) {
            Ok(Item::Int(v)) => Some(v),
            _ => None,
        })
        .sum()
}

/// CPython's `test_shared_memory_ShareableList_basics` and `..._pickling`, from two
/// processes.
#[test]
fn shareable_list_from_two_processes() {
    let items = vec![
        Item::Int(42),
        Item::from("howdy"),
        Item::Float(-273.154),
        Item::None,
        Item::Bool(true),
        Item::Bytes(b"100".to_vec()),
        Item::Int(42),
    ];
    let list = ShareableList::with_capacity(items.clone(), 16).unwrap();
    assert_eq!(list.len(), 7);
    assert_eq!(list.count(&Item::Int(42)), 2);
    assert_eq!(list.index(&Item::None), Some(3));
    assert_eq!(list.index(&Item::Int(7)), None);
    assert!(list.get(7).unwrap_err().is_index_out_of_range());
    for m in [StartMethod::Spawn, StartMethod::Fork] {
        list.set(0, 42i64).unwrap();
        list.set(1, "howdy").unwrap();
        let mut p = support::start(m, edit_list, list.name().to_string());
        let seen = p
            .join_timeout(TIMEOUT)
            .unwrap()
            .expect("the child's checks");
        assert_eq!(seen[..3], items[..3], "{m:?}");
        assert_eq!(list.get(0).unwrap(), Item::Int(43));
        assert_eq!(list.get(1).unwrap(), Item::from("changed"));
        assert_eq!(list.get(4).unwrap(), Item::Bool(false));
        assert_eq!(list.get(5).unwrap(), Item::Bytes(vec![0, 255]));
        assert_eq!(list.get(2).unwrap(), Item::Float(-273.154));
    }
    let mut p = support::start(StartMethod::Spawn, sum_ints, list);
    assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 43 + 42);
}

/// A block that another process wrote, and that is not a list, is an error on attach:
/// never a panic or a read out of bounds.
#[test]
fn shareable_list_attach_checks_the_header() {
    let junk = SharedMemory::create(64).unwrap();
    junk.write_at(0, b"not a list at all");
    assert!(ShareableList::attach(junk.name())
        .unwrap_err()
        .is_bad_list());
    // A valid magic with a header claiming more slots than fit.
    let lying = SharedMemory::create(40).unwrap();
    lying.write_at(0, b"GPSLIST1");
    lying.write_at(8, &1000u64.to_le_bytes());
    let e = ShareableList::attach(lying.name()).unwrap_err();
    assert!(e.is_bad_list(), "{e}");
    // A str slot whose length was overwritten past its capacity reads as an error.
    let list = ShareableList::new(["abc"]).unwrap();
    list.shm().write_at(24, &u64::MAX.to_le_bytes());
    assert!(ShareableList::attach(list.name())
        .unwrap()
        .get(0)
        .unwrap_err()
        .is_bad_list());
    assert!(ShareableList::attach("no-such-list-gpuproc")
        .unwrap_err()
        .is_not_found());
}

// ---- The resource tracker: CPython's
// `test_shared_memory_cleaned_after_process_termination` ----

/// Creates two named blocks and a `ShareableList`, reports their names and this process's
/// tracker, and waits to be killed.
fn hold_three_blocks(q: Queue<(Vec<String>, u32)>) {
    let a = SharedMemory::create(4096).unwrap();
    let b = SharedMemory::create(64).unwrap();
    let c = ShareableList::new([1i64, 2, 3]).unwrap();
    let names = vec![a.name().into(), b.name().into(), c.name().into()];
    let tracker = gpuproc::shm::__resource_tracker_pid_for_tests().expect("a tracker started");
    q.put((names, tracker)).unwrap();
    support::block_forever()
}

fn in_dev_shm(name: &str) -> bool {
    std::path::Path::new("/dev/shm").join(name).exists()
}

/// A process killed (SIGKILL, or SIGTERM) while holding three named blocks: its tracker
/// unlinks them within 1 s of the process ending, and ends.
#[test]
fn blocks_of_a_killed_process_are_unlinked_by_its_tracker() {
    for (how, m) in [
        ("SIGKILL", StartMethod::Spawn),
        ("SIGTERM", StartMethod::Fork),
    ] {
        let q = Queue::new().unwrap();
        let mut p = support::start(m, hold_three_blocks, q.clone());
        let (names, tracker) = q.get_timeout(TIMEOUT).unwrap();
        assert!(names.iter().all(|n| in_dev_shm(n)), "{names:?}");
        if how == "SIGKILL" {
            p.kill().unwrap();
        } else {
            p.terminate().unwrap();
        }
        assert!(p.join_timeout(TIMEOUT).is_err(), "{how}: it was killed");
        // Its last user is gone: the tracker unlinks what was left, then ends.
        let left = support::wait_all_ended(
            &[tracker],
            gpuproc::time::deadline(Duration::from_secs(1)).unwrap(),
        );
        assert!(left.is_empty(), "{how}: the tracker {tracker} still runs");
        let still: Vec<_> = names.iter().filter(|n| in_dev_shm(n)).collect();
        assert!(still.is_empty(), "{how}: {still:?} left in /dev/shm");
    }
}

/// Blocks unlinked by their creator are unregistered: a tracker never unlinks a block made
/// later under the same name by someone else.
#[test]
fn the_tracker_leaves_a_reused_name_alone() {
    fn create_unlink_and_die((name, q): (String, Queue<(u32, String)>)) {
        let a = SharedMemory::create_named(&name, 64).unwrap();
        a.unlink().unwrap();
        // Dropped without unlinking again; then the name is reused by the parent.
        drop(a);
        let b = SharedMemory::create(64).unwrap();
        let leaked = b.name().to_string();
        std::mem::forget(b); // leaked: the tracker removes it
        let tracker = gpuproc::shm::__resource_tracker_pid_for_tests().unwrap();
        q.put((tracker, leaked)).unwrap();
        support::block_forever()
    }
    let name = format!("gpuproc-test-reuse-{}", std::process::id());
    let q = Queue::new().unwrap();
    let mut p = support::start(
        StartMethod::Spawn,
        create_unlink_and_die,
        (name.clone(), q.clone()),
    );
    let (tracker, leaked) = q.get_timeout(TIMEOUT).unwrap();
    let mine = SharedMemory::create_named(&name, 64).unwrap();
    p.kill().unwrap();
    let _ = p.join_timeout(TIMEOUT);
    assert!(
        support::wait_all_ended(&[tracker], gpuproc::time::deadline(TIMEOUT).unwrap()).is_empty()
    );
    assert!(
        in_dev_shm(&name),
        "the tracker removed a block it did not register"
    );
    assert!(!in_dev_shm(&leaked), "the tracker left the leaked block");
    drop(mine);
    assert!(!in_dev_shm(&name));
}

// ---- Managers: CPython's `_TestDict` (`test_dict`) and manager death ----

/// 1,000 updates of its own keys, from a pool task.
fn thousand_updates((d, task): (ManagedDict<u64, u64>, u64)) -> u64 {
    for i in 0..1000 {
        d.set(&(task * 1000 + i), &i).unwrap();
    }
    task
}

/// Sets keys until the manager is gone; says so once started, and returns whether the error
/// said the manager was lost.
fn set_until_lost((d, started): (ManagedDict<u64, u64>, Queue<()>)) -> bool {
    d.set(&0, &0).unwrap();
    started.put(()).unwrap();
    let mut i = 0u64;
    loop {
        i += 1;
        if let Err(e) = d.set(&(i % 100), &i) {
            return e.is_lost();
        }
    }
}

/// CPython's `test_dict`, from 4 processes (as pool tasks) doing 1,000 updates each: none
/// is lost.
#[test]
fn managed_dict_from_four_processes() {
    let manager = Manager::start().unwrap();
    let d: ManagedDict<u64, u64> = manager.dict().unwrap();
    d.set(&u64::MAX, &7).unwrap();
    assert_eq!(d.get(&u64::MAX).unwrap(), Some(7));
    assert_eq!(d.remove(&u64::MAX).unwrap(), Some(7));
    assert_eq!(d.get(&u64::MAX).unwrap(), None);
    let pool = pool(4);
    let done = pool
        .map(thousand_updates, (0..4u64).map(|t| (d.clone(), t)))
        .unwrap();
    assert_eq!(done, [0, 1, 2, 3]);
    assert_eq!(d.len().unwrap(), 4000);
    let mut items = d.items().unwrap();
    items.sort();
    assert_eq!(items[2999], (2999, 999));
    let other: ManagedDict<String, Vec<u8>> = manager.dict().unwrap();
    assert!(other.is_empty().unwrap());
    d.clear().unwrap();
    assert_eq!(d.len().unwrap(), 0);
}

/// A manager SIGKILLed while clients use it: every client gets an error (not a hang)
/// within 1 s.
#[test]
fn a_killed_manager_gives_errors_to_every_client() {
    let mut manager = Manager::start().unwrap();
    let d: ManagedDict<u64, u64> = manager.dict().unwrap();
    let started = Queue::new().unwrap();
    let mut clients: Vec<_> = (0..3)
        .map(|_| {
            support::start(
                StartMethod::Spawn,
                set_until_lost,
                (d.clone(), started.clone()),
            )
        })
        .collect();
    for _ in 0..3 {
        started.get_timeout(TIMEOUT).unwrap();
    }
    let pid = manager.pid().unwrap();
    // SAFETY: a plain system call on a child process we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = gpuproc::time::deadline(Duration::from_secs(1)).unwrap();
    for c in &mut clients {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            c.join_timeout(left).unwrap(),
            "the client saw the manager lost"
        );
    }
    assert!(d.get(&1).unwrap_err().is_lost());
    manager.shutdown();
}

/// A manager that does not answer (stopped) gives a timeout, not a hang; once it runs
/// again, the proxy works again (on a new connection). A dict, used in place, does not
/// need the manager to answer: it works on meanwhile.
#[test]
fn a_stopped_manager_gives_a_timeout() {
    let manager = Manager::start().unwrap();
    let l: ManagedList<u8> = manager.list().unwrap();
    let l = l.with_timeout(Duration::from_millis(200));
    l.append(&1).unwrap();
    let d: ManagedDict<u8, u8> = manager.dict().unwrap();
    d.set(&1, &1).unwrap();
    let pid = manager.pid().unwrap() as i32;
    // SAFETY: plain system calls on a child process we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // The signal is delivered after kill() returns: wait until the manager is stopped.
    let deadline = gpuproc::time::deadline(TIMEOUT).unwrap();
    while !is_stopped(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the manager never stopped"
        );
        std::thread::yield_now();
    }
    let e = l.get(0).unwrap_err();
    let in_place = (d.set(&2, &2), d.get(&1));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(e.is_timeout(), "{e}");
    assert_eq!(l.get(0).unwrap(), Some(1));
    assert!(in_place.0.is_ok(), "{:?}", in_place.0);
    assert_eq!(in_place.1.unwrap(), Some(1));
    assert_eq!(d.get(&2).unwrap(), Some(2));
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|f| f == "T"))
        })
        .unwrap_or(false)
}

/// Appends 250 items, from a pool task.
fn append_250((l, task): (ManagedList<u64>, u64)) {
    for i in 0..250 {
        l.append(&(task * 1000 + i)).unwrap();
    }
}

/// CPython's `_TestContainers.test_list`: a managed list from 4 pool tasks, then indexing,
/// assignment and pop.
#[test]
fn managed_list_from_four_processes() {
    let manager = Manager::start().unwrap();
    let l: ManagedList<u64> = manager.list().unwrap();
    assert!(l.is_empty().unwrap());
    let pool = pool(4);
    pool.map(append_250, (0..4u64).map(|t| (l.clone(), t)))
        .unwrap();
    assert_eq!(l.len().unwrap(), 1000);
    let mut all = l.to_vec().unwrap();
    all.sort();
    assert_eq!(all[250], 1000);
    l.set(0, &7).unwrap();
    assert_eq!(l.get(0).unwrap(), Some(7));
    assert_eq!(l.get(1000).unwrap(), None);
    assert!(l.set(1000, &1).is_err());
    let last = l.get(999).unwrap();
    assert_eq!(l.pop().unwrap(), last);
    assert_eq!(l.len().unwrap(), 999);
}

/// Sets a namespace attribute and adds to a value, in another process.
fn touch((ns, v): (ManagedNamespace, ManagedValue<f64>)) {
    ns.set("name", "child").unwrap();
    ns.set("z", &3u8).unwrap();
    v.set(&(v.get().unwrap() + 1.5)).unwrap();
}

/// CPython's `_TestNamespace.test_namespace` and `_TestContainers` for `Value`.
#[test]
fn managed_namespace_and_value() {
    let manager = Manager::start().unwrap();
    let ns = manager.namespace().unwrap();
    ns.set("name", "parent").unwrap();
    ns.set("x", &[1u32, 2]).unwrap();
    let v = manager.value(&1.0f64).unwrap();
    let mut p = support::start(StartMethod::Spawn, touch, (ns.clone(), v.clone()));
    p.join_timeout(TIMEOUT).unwrap();
    assert_eq!(ns.get::<String>("name").unwrap().as_deref(), Some("child"));
    assert_eq!(ns.get::<[u32; 2]>("x").unwrap(), Some([1, 2]));
    assert_eq!(ns.get::<u8>("z").unwrap(), Some(3));
    assert_eq!(ns.get::<u8>("missing").unwrap(), None);
    assert!(ns.remove("z").unwrap());
    assert!(!ns.remove("z").unwrap());
    assert_eq!(v.get().unwrap(), 2.5);
}
