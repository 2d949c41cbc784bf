//! Cases of CPython's `Lib/test/_test_multiprocessing.py` (and, for `Queue::shutdown`,
//! `Lib/test/test_queue.py`) ported to gpuproc: waiting on many objects, sentinels, closing
//! processes, barriers with actions, aborts and resets, shutting queues down,
//! `recv_bytes_into`. Each test names the CPython case it ports.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gpuproc::channel::{ChannelError, Connection, JoinableQueue, Pipe, Queue, SimpleQueue};
use gpuproc::connection::{wait, wait_indices, Client, Listener, Waitable};
use gpuproc::shm::SharedValue;
use gpuproc::sync::{Barrier, Event, Semaphore};
use gpuproc::{Process, ProcessError, StartMethod};

use crate::support::{start, TIMEOUT};

const SHORT: Duration = Duration::from_millis(50);

// --- multiprocessing.connection.wait (TestWait) ---------------------------------------------

fn send_ten(w: Connection) {
    for i in 0..10u32 {
        w.send(&(i, std::process::id())).unwrap();
    }
}

/// `TestWait.test_wait`: four children write into one-way pipes; the parent reads them
/// all through `wait` until every pipe is closed.
#[test]
fn wait_reads_every_message_from_four_children() {
    let mut readers = Vec::new();
    let mut procs = Vec::new();
    for _ in 0..4 {
        let (r, w) = Pipe::simplex().unwrap();
        let p = start(StartMethod::ForkServer, send_ten, w);
        // The child holds its own copy of `w`; the pipe ends when the child does.
        readers.push(r);
        procs.push(p);
    }
    let mut messages = Vec::new();
    while !readers.is_empty() {
        let ready = wait_indices(&readers, Some(TIMEOUT)).unwrap();
        assert!(!ready.is_empty(), "nothing became ready in {TIMEOUT:?}");
        for i in ready.into_iter().rev() {
            match readers[i].try_recv::<(u32, u32)>() {
                Ok(m) => messages.push(m),
                Err(e) if e.is_disconnected() => {
                    readers.remove(i);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let mut expected: Vec<(u32, u32)> = procs
        .iter()
        .flat_map(|p| {
            let pid = p.pid().unwrap();
            (0..10).map(move |i| (i, pid))
        })
        .collect();
    expected.sort();
    messages.sort();
    assert_eq!(messages, expected);
    for p in &mut procs {
        p.join_timeout(TIMEOUT).unwrap();
    }
}

/// `TestWait.test_wait_timeout`: nothing ready, then one of two ends.
#[test]
fn wait_times_out_empty_then_returns_what_is_ready() {
    let (a, b) = Pipe::new().unwrap();
    let started = Instant::now();
    assert!(wait([&a, &b], Some(SHORT)).unwrap().is_empty());
    assert!(started.elapsed() >= SHORT);
    b.send(&()).unwrap();
    let ready = wait([&a, &b], Some(TIMEOUT)).unwrap();
    assert_eq!(ready.len(), 1);
    assert!(std::ptr::eq(ready[0], &a));
}

fn signal_and_wait((sem, go): (Semaphore, Event)) {
    sem.release().unwrap();
    go.wait_timeout(TIMEOUT);
}

/// `TestWait.test_wait_integer`: a process's sentinel waited on together with pipes.
#[test]
fn wait_on_a_sentinel_among_pipes() {
    for m in StartMethod::all() {
        let sem = Semaphore::new(0).unwrap();
        let go = Event::new().unwrap();
        let (a, b) = Pipe::new().unwrap();
        let mut p = start(m, signal_and_wait, (sem.clone(), go.clone()));
        let s = p.sentinel().unwrap();
        assert!(sem.acquire_timeout(TIMEOUT));
        let objects: [&dyn Waitable; 3] = [&a, &s, &b];
        assert!(wait_indices(&objects, Some(SHORT)).unwrap().is_empty());
        go.set();
        assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [1], "{m:?}");
        a.send(&()).unwrap();
        assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [1, 2]);
        b.send(&()).unwrap();
        assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [0, 1, 2]);
        p.join_timeout(TIMEOUT).unwrap();
        assert_eq!(p.exitcode(), Some(0));
    }
}

fn put_one(q: Queue<u32>) {
    q.put(5).unwrap();
}

/// `wait` over every kind at once: a queue, a socket connection, a pipe and a sentinel.
#[test]
fn wait_mixes_queues_socket_connections_pipes_and_sentinels() {
    let dir = std::env::temp_dir().join(format!("gpuproc-wait-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listener = Listener::bind(dir.join("sock"), b"key").unwrap();
    let address = listener.address().clone();
    let client =
        std::thread::spawn(move || Client::connect_timeout(address, b"key", TIMEOUT).unwrap());
    let theirs = listener.accept_timeout(TIMEOUT).unwrap();
    let ours = client.join().unwrap();

    let q = Queue::<u32>::new().unwrap();
    let jq = JoinableQueue::<u32>::new().unwrap();
    let sq = SimpleQueue::<u32>::new().unwrap();
    let (pipe, _other) = Pipe::new().unwrap();
    let go = Event::new().unwrap();
    let mut p = start(
        StartMethod::ForkServer,
        signal_and_wait,
        (Semaphore::new(0).unwrap(), go.clone()),
    );
    let s = p.sentinel().unwrap();
    let objects: [&dyn Waitable; 6] = [&q, &ours, &pipe, &s, &jq, &sq];
    assert!(wait_indices(&objects, Some(SHORT)).unwrap().is_empty());

    let mut putter = start(StartMethod::ForkServer, put_one, q.clone());
    assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [0]);
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), 5);
    putter.join_timeout(TIMEOUT).unwrap();

    theirs.send_bytes(b"hi").unwrap();
    assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [1]);
    assert_eq!(ours.recv_bytes_timeout(TIMEOUT).unwrap(), b"hi");

    go.set();
    assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [3]);
    p.join_timeout(TIMEOUT).unwrap();
    jq.put(1).unwrap();
    sq.put(2).unwrap();
    assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [3, 4, 5]);
    // A shut-down queue is ready: its get says so at once.
    q.shutdown(false).unwrap();
    assert_eq!(wait_indices(&objects, Some(TIMEOUT)).unwrap(), [0, 3, 4, 5]);
    assert!(q.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
    drop(listener);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn hang(go: Event) {
    go.wait_timeout(TIMEOUT);
}

/// `_TestProcess.test_sentinel`, and sentinels of killed processes: not ready while the
/// process runs, ready once it ends, however it ends.
#[test]
fn sentinels_become_ready_when_the_process_ends_or_is_killed() {
    for m in StartMethod::all() {
        let go = Event::new().unwrap();
        let mut p = Process::new(hang, go.clone())
            .with_start_method(m)
            .allow_fork_with_threads(true);
        let e = p.sentinel().unwrap_err();
        assert!(matches!(e, ProcessError::NotStarted { .. }), "{e}");
        p.start().unwrap();
        let s = p.sentinel().unwrap();
        assert_eq!(s.pid(), p.pid().unwrap());
        assert!(!s.is_ready());
        assert!(wait([&s], Some(Duration::ZERO)).unwrap().is_empty());
        p.kill().unwrap();
        assert_eq!(wait([&s], Some(TIMEOUT)).unwrap().len(), 1, "{m:?}");
        assert!(p.join_timeout(TIMEOUT).unwrap_err().is_killed());
        assert_eq!(p.exitcode(), Some(-9));
        assert!(s.is_ready());

        // And a process that returns: a sentinel taken after the end is ready too.
        let go = Event::new().unwrap();
        let mut p = start(m, hang, go.clone());
        let early = p.sentinel().unwrap();
        go.set();
        assert_eq!(wait([&early], Some(TIMEOUT)).unwrap().len(), 1, "{m:?}");
        p.join_timeout(TIMEOUT).unwrap();
        assert!(p.sentinel().unwrap().is_ready());
    }
}

// --- Process.close, current_process, parent_process ------------------------------------------

fn get_one(q: Queue<u32>) -> u32 {
    q.get_timeout(TIMEOUT).unwrap()
}

/// `_TestProcess.test_close`.
#[test]
fn a_closed_process_refuses_further_use() {
    for m in StartMethod::all() {
        let q = Queue::new().unwrap();
        let mut p = start(m, get_one, q.clone());
        assert!(p.is_alive());
        let e = p.close().unwrap_err();
        assert!(matches!(e, ProcessError::StillRunning { .. }), "{e}");
        q.put(7).unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 7);
        assert!(!p.is_alive());
        assert_eq!(p.exitcode(), Some(0));
        let pid = p.pid();
        p.close().unwrap();
        assert!(!p.is_alive());
        assert_eq!(p.exitcode(), Some(0));
        assert_eq!(p.pid(), pid);
        assert!(p.join().unwrap_err().is_closed());
        assert!(p.join_timeout(SHORT).unwrap_err().is_closed());
        assert!(p.terminate().unwrap_err().is_closed());
        assert!(p.kill().unwrap_err().is_closed());
        assert!(p.sentinel().unwrap_err().is_closed());
        assert!(p.start().unwrap_err().is_closed());
        p.close().unwrap();
    }
    // Closing one that never started is allowed, as in Python; starting it then is not.
    let mut p = Process::new(get_one, Queue::new().unwrap());
    p.close().unwrap();
    assert!(p.start().unwrap_err().is_closed());
}

type Seen = (
    bool,
    Option<i32>,
    u32,
    Option<(bool, Option<i32>, u32, String)>,
);

fn who_am_i(_: ()) -> Seen {
    let me = gpuproc::current_process();
    let parent = gpuproc::parent_process()
        .map(|pp| (pp.is_alive(), pp.exitcode(), pp.pid(), pp.name.clone()));
    (me.is_alive(), me.exitcode(), me.pid(), parent)
}

/// `_TestProcess.test_current` and `test_parent_process_attributes`: `is_alive`,
/// `exitcode` and `pid` of the current and parent processes.
#[test]
fn current_and_parent_process_answer_is_alive_exitcode_and_pid() {
    let me = gpuproc::current_process();
    assert!(me.is_alive());
    assert_eq!(me.exitcode(), None);
    assert_eq!(me.pid(), std::process::id());
    assert!(gpuproc::parent_process().is_none());
    for m in StartMethod::all() {
        let mut p = start(m, who_am_i, ());
        let child_pid = p.pid().unwrap();
        let (alive, code, pid, parent) = p.join_timeout(TIMEOUT).unwrap();
        assert!(alive);
        assert_eq!(code, None);
        assert_eq!(pid, child_pid);
        let (parent_alive, parent_code, parent_pid, parent_name) = parent.unwrap();
        assert!(parent_alive, "{m:?}");
        assert_eq!(parent_code, None);
        assert_eq!(parent_pid, std::process::id());
        assert_eq!(parent_name, me.name);
    }
    // active_children: alive while running.
    let go = Event::new().unwrap();
    let mut p = start(StartMethod::ForkServer, hang, go.clone());
    let pid = p.pid().unwrap();
    let entry = gpuproc::active_children()
        .into_iter()
        .find(|c| c.pid == pid)
        .unwrap();
    assert!(entry.is_alive());
    assert_eq!(entry.exitcode(), None);
    go.set();
    p.join_timeout(TIMEOUT).unwrap();
    assert!(!entry.is_alive());
}

// --- Barrier (_TestBarrier, N = 5, with processes) ------------------------------------------

const N: u32 = 5;

static COUNTER: OnceLock<SharedValue<u32>> = OnceLock::new();

fn count_once() {
    let c = COUNTER.get().expect("set before the barrier");
    c.update(|v| v + 1).unwrap();
}

fn action_party((b, counter): (Barrier, SharedValue<u32>)) -> (u32, u32) {
    let _ = COUNTER.set(counter.clone());
    b.wait().unwrap();
    let first = counter.get();
    b.wait().unwrap();
    (first, counter.get())
}

/// `_TestBarrier.test_action`: the action runs exactly once per generation, in one of
/// the five processes, before any of them passes.
#[test]
fn barrier_action_runs_exactly_once_among_five_processes() {
    for m in StartMethod::all() {
        let counter = SharedValue::new(0u32).unwrap();
        let b = Barrier::new(N)
            .unwrap()
            .with_action(count_once)
            .with_timeout(TIMEOUT);
        let mut ps: Vec<_> = (0..N)
            .map(|_| start(m, action_party, (b.clone(), counter.clone())))
            .collect();
        for p in &mut ps {
            assert_eq!(p.join_timeout(TIMEOUT).unwrap(), (1, 2), "{m:?}");
        }
        assert_eq!(counter.get(), 2);
    }
}

/// What a party of the abort and reset cases saw: passed the second wait, broken there,
/// passed the last wait.
type Parts = (bool, bool, bool);

fn abort_party(b: Barrier) -> Parts {
    match b.wait_timeout(TIMEOUT) {
        Ok(i) if i == N / 2 => {
            b.abort();
            (false, false, false)
        }
        Ok(_) => match b.wait_timeout(TIMEOUT) {
            Ok(_) => (true, false, false),
            Err(e) => (false, e.is_broken_barrier(), false),
        },
        Err(e) => (false, e.is_broken_barrier(), false),
    }
}

fn tally<A>(ps: &mut [Process<A, Parts>]) -> [usize; 3]
where
    A: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut n = [0; 3];
    for p in ps {
        let (a, b, c) = p.join_timeout(TIMEOUT).unwrap();
        n[0] += a as usize;
        n[1] += b as usize;
        n[2] += c as usize;
    }
    n
}

/// `_TestBarrier.test_abort`: one party aborts; every other one gets BrokenBarrier.
#[test]
fn barrier_abort_breaks_it_for_the_other_four() {
    let b = Barrier::new(N).unwrap();
    let mut ps: Vec<_> = (0..N)
        .map(|_| start(StartMethod::ForkServer, abort_party, b.clone()))
        .collect();
    assert_eq!(tally(&mut ps), [0, N as usize - 1, 0]);
    assert!(b.broken());
}

fn reset_party(b: Barrier) -> Parts {
    let mut seen = (false, false, false);
    let i = b.wait_timeout(TIMEOUT).unwrap();
    if i == N / 2 {
        // Wait until the others are all in the barrier again.
        let deadline = gpuproc::time::deadline(TIMEOUT);
        while b.n_waiting() < N - 1 {
            assert_ne!(gpuproc::time::remaining(deadline), Some(Duration::ZERO));
            std::thread::yield_now();
        }
        b.reset();
    } else {
        match b.wait_timeout(TIMEOUT) {
            Ok(_) => seen.0 = true,
            Err(e) => seen.1 = e.is_broken_barrier(),
        }
    }
    // Everybody passes it again.
    seen.2 = b.wait_timeout(TIMEOUT).is_ok();
    seen
}

/// `_TestBarrier.test_reset`: a reset sends the waiters away broken, and all five pass
/// the barrier afterwards.
#[test]
fn barrier_reset_breaks_the_waiters_and_then_lets_all_pass() {
    let b = Barrier::new(N).unwrap();
    let mut ps: Vec<_> = (0..N)
        .map(|_| start(StartMethod::ForkServer, reset_party, b.clone()))
        .collect();
    assert_eq!(tally(&mut ps), [0, N as usize - 1, N as usize]);
    assert!(!b.broken());
}

fn abort_and_reset_party((b, b2): (Barrier, Barrier)) -> Parts {
    let (passed, broken, _) = abort_party(b.clone());
    // Meet first so that everyone has left `b` when it is reset, and again so that nobody
    // enters it before.
    if b2.wait_timeout(TIMEOUT).unwrap() == N / 2 {
        b.reset();
    }
    b2.wait_timeout(TIMEOUT).unwrap();
    (passed, broken, b.wait_timeout(TIMEOUT).is_ok())
}

/// `_TestBarrier.test_abort_and_reset`.
#[test]
fn barrier_abort_then_reset_makes_it_usable_again() {
    let b = Barrier::new(N).unwrap();
    let b2 = Barrier::new(N).unwrap();
    let mut ps: Vec<_> = (0..N)
        .map(|_| {
            start(
                StartMethod::ForkServer,
                abort_and_reset_party,
                (b.clone(), b2.clone()),
            )
        })
        .collect();
    assert_eq!(tally(&mut ps), [0, N as usize - 1, N as usize]);
}

fn late_party((b, late): (Barrier, Event)) -> bool {
    let i = b.wait_timeout(TIMEOUT).unwrap();
    if i == N / 2 {
        // This one comes back only once the others have given up.
        late.wait_timeout(TIMEOUT);
        return b.wait().is_err_and(|e| e.is_broken_barrier());
    }
    // The default timeout (short) applies.
    let broken = b.wait().is_err_and(|e| e.is_broken_barrier());
    late.set();
    broken
}

/// `_TestBarrier.test_default_timeout`: a party that comes later than the default timeout
/// finds the barrier broken, as do the others.
#[test]
fn barrier_default_timeout_breaks_it() {
    let b = Barrier::new(N)
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let late = Event::new().unwrap();
    let mut ps: Vec<_> = (0..N)
        .map(|_| {
            start(
                StartMethod::ForkServer,
                late_party,
                (b.clone(), late.clone()),
            )
        })
        .collect();
    for p in &mut ps {
        assert!(p.join_timeout(TIMEOUT).unwrap());
    }
    assert!(b.broken());
}

// --- Queue.shutdown (test_queue.py, Python 3.13) ---------------------------------------------

fn blocked_get(q: Queue<u32>) -> bool {
    q.get_timeout(TIMEOUT).unwrap_err().is_shutdown()
}

fn blocked_put(q: Queue<u32>) -> bool {
    q.put_timeout(9, TIMEOUT).unwrap_err().is_shutdown()
}

/// `test_shutdown_get` and `test_shutdown_put`: getters waiting on an empty queue and
/// putters waiting on a full one, in other processes, wake up with ShutDown.
#[test]
fn queue_shutdown_wakes_blocked_getters_and_putters() {
    for m in StartMethod::all() {
        let empty = Queue::<u32>::new().unwrap();
        let full = Queue::<u32>::bounded(1).unwrap();
        full.put(1).unwrap();
        let mut getters: Vec<_> = (0..2)
            .map(|_| start(m, blocked_get, empty.clone()))
            .collect();
        let mut putters: Vec<_> = (0..2)
            .map(|_| start(m, blocked_put, full.clone()))
            .collect();
        empty.shutdown(false).unwrap();
        full.shutdown(false).unwrap();
        for p in getters.iter_mut().chain(&mut putters) {
            assert!(p.join_timeout(TIMEOUT).unwrap(), "{m:?}");
        }
        // The item already in the full queue can still be got, then nothing.
        assert_eq!(full.get_timeout(TIMEOUT).unwrap(), 1);
        assert!(full.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
    }
}

/// A putter waiting for room in an unbounded queue's socket buffer wakes up too.
#[test]
fn queue_shutdown_wakes_a_putter_waiting_for_buffer_room() {
    let q = Queue::<gpuproc::channel::Bytes>::new().unwrap();
    let item = gpuproc::channel::Bytes(vec![0u8; 32 * 1024]);
    let mut n = 0;
    loop {
        match q.try_put(item.clone()) {
            Ok(()) => n += 1,
            Err(e) if e.is_full() => break,
            Err(e) => panic!("{e}"),
        }
        assert!(n < 100_000, "the socket never filled");
    }
    let q2 = q.clone();
    let t = std::thread::spawn(move || {
        q2.put_timeout(gpuproc::channel::Bytes(vec![1]), TIMEOUT)
            .unwrap_err()
            .into_error()
    });
    q.shutdown(false).unwrap();
    assert!(matches!(t.join().unwrap(), ChannelError::ShutDown));
    // What was queued drains, then the end.
    for _ in 0..n {
        q.get_timeout(TIMEOUT).unwrap();
    }
    assert!(q.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
}

fn put_after((q, go): (Queue<u32>, Event)) -> bool {
    go.wait_timeout(TIMEOUT);
    q.put_timeout(1, TIMEOUT).unwrap_err().is_shutdown()
}

/// `test_shutdown_empty`, `test_shutdown_nonempty` and `test_shutdown_immediate`: after a
/// shutdown puts fail everywhere; gets drain what is left (nothing, with immediate), and
/// a joinable queue's join returns.
#[test]
fn queue_shutdown_drains_or_drops_what_is_left() {
    let q = Queue::<u32>::new().unwrap();
    let go = Event::new().unwrap();
    let mut p = start(StartMethod::ForkServer, put_after, (q.clone(), go.clone()));
    for i in 0..3 {
        q.put(i).unwrap();
    }
    assert!(!q.is_shutdown());
    q.shutdown(false).unwrap();
    assert!(q.is_shutdown());
    go.set();
    assert!(p.join_timeout(TIMEOUT).unwrap());
    assert!(q.put_timeout(3, TIMEOUT).unwrap_err().is_shutdown());
    assert!(q.try_put(3).unwrap_err().is_shutdown());
    for i in 0..3 {
        assert_eq!(q.get_timeout(TIMEOUT).unwrap(), i);
    }
    assert!(q.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
    assert!(q.try_get().unwrap_err().is_shutdown());

    let jq = JoinableQueue::<u32>::bounded(5).unwrap();
    for i in 0..3 {
        jq.put(i).unwrap();
    }
    jq.shutdown(true).unwrap();
    assert!(jq.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
    assert_eq!(jq.qsize(), 0);
    jq.join_timeout(TIMEOUT).unwrap();
    // A second, immediate shutdown of a queue shut down gently drops what is left.
    let q = Queue::<u32>::new().unwrap();
    q.put(1).unwrap();
    q.shutdown(false).unwrap();
    q.shutdown(true).unwrap();
    assert!(q.get_timeout(TIMEOUT).unwrap_err().is_shutdown());
}

// --- Connection.recv_bytes_into, poll (_TestConnection) -------------------------------------

fn send_bytes_back((conn, msgs): (Connection, Vec<Vec<u8>>)) {
    for m in msgs {
        conn.send_bytes(&m).unwrap();
    }
}

/// `_TestConnection.test_connection`'s `recv_bytes_into` part: into a buffer, at an
/// offset, and a message too long for it (BufferTooShort, carrying the message).
#[test]
fn recv_bytes_into_fills_the_buffer_or_hands_the_message_back() {
    let msg = b"hello world".to_vec();
    let long = vec![7u8; 100_000]; // over 64 KiB: it comes through shared memory
    let (ours, theirs) = Pipe::new().unwrap();
    let mut p = start(
        StartMethod::ForkServer,
        send_bytes_back,
        (
            theirs,
            vec![msg.clone(), msg.clone(), long.clone(), msg.clone()],
        ),
    );
    let mut buf = vec![0u8; 64];
    assert_eq!(
        ours.recv_bytes_into_timeout(&mut buf, 0, TIMEOUT).unwrap(),
        11
    );
    assert_eq!(&buf[..11], &msg[..]);
    let mut buf = vec![0u8; 64];
    assert_eq!(ours.recv_bytes_into(&mut buf, 40).unwrap(), 11);
    assert_eq!(&buf[40..51], &msg[..]);
    assert!(buf[..40].iter().chain(&buf[51..]).all(|&b| b == 0));
    let e = ours.recv_bytes_into(&mut buf, 8).unwrap_err();
    assert!(e.is_buffer_too_short(), "{e}");
    match e {
        ChannelError::BufferTooShort {
            size,
            room,
            message,
        } => {
            assert_eq!((size, room), (100_000, 56));
            assert_eq!(message, long);
        }
        other => panic!("{other}"),
    }
    // An offset past the end receives nothing: the next message is still there.
    let e = ours.recv_bytes_into(&mut buf, 65).unwrap_err();
    assert!(matches!(e, ChannelError::InvalidArgument(_)), "{e}");
    assert_eq!(ours.recv_bytes_timeout(TIMEOUT).unwrap(), msg);
    p.join_timeout(TIMEOUT).unwrap();
}

/// `_TestConnection.test_duplex_false`: the sending end of a one-way pipe cannot poll
/// (Python raises OSError).
#[test]
fn poll_on_a_write_only_end_is_an_error() {
    let (r, w) = Pipe::simplex().unwrap();
    let e = w.poll(Duration::ZERO).unwrap_err();
    assert!(matches!(e, ChannelError::Unsupported(_)), "{e}");
    let mut buf = [0u8; 4];
    assert!(matches!(
        w.recv_bytes_into(&mut buf, 0).unwrap_err(),
        ChannelError::Unsupported(_)
    ));
    assert!(!r.poll(Duration::ZERO).unwrap());
}
