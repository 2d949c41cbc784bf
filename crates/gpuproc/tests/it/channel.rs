//! Pipes and queues: with every start method, under load, and against faults and bad input.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use gpuproc::channel::{
    Bytes, ChannelError, Connection, JoinableQueue, Pipe, Queue, SharedBytes, SimpleQueue,
};
use gpuproc::StartMethod;
use proptest::prelude::*;

use crate::support::{self, start, TIMEOUT};

const SHORT: Duration = Duration::from_millis(50);

fn echo(conn: Connection) -> u32 {
    // With the Fork start method the child also holds the parent's end, so it would never
    // see the pipe close: a sentinel says when to stop.
    let mut n = 0;
    loop {
        let v: Option<(u32, String)> = conn.recv_timeout(TIMEOUT).unwrap();
        match v {
            Some(v) => conn.send(&v).unwrap(),
            None => return n,
        }
        n += 1;
    }
}

#[test]
fn pipe_round_trips_with_every_start_method() {
    for m in StartMethod::all() {
        let (ours, theirs) = Pipe::new().unwrap();
        let mut p = start(m, echo, theirs);
        for i in 0..10 {
            ours.send(&Some((i, format!("message {i}")))).unwrap();
            let back: (u32, String) = ours.recv_timeout(TIMEOUT).unwrap();
            assert_eq!(back, (i, format!("message {i}")), "{m:?}");
        }
        ours.send(&None::<(u32, String)>).unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 10, "{m:?}");
    }
}

fn echo_without_polling(conn: Connection) -> u32 {
    gpuproc::channel::set_max_spin(Duration::ZERO);
    echo(conn)
}

#[test]
fn receives_that_sleep_at_once_still_wake_for_every_message() {
    // Polling off on both sides: every receive sleeps in the kernel and is woken by the
    // send, so nothing relies on the receiver polling. (Process-wide, so restored after.)
    let saved = gpuproc::channel::max_spin();
    gpuproc::channel::set_max_spin(Duration::ZERO);
    assert_eq!(gpuproc::channel::max_spin(), Duration::ZERO);
    for m in StartMethod::all() {
        let (ours, theirs) = Pipe::new().unwrap();
        let mut p = start(m, echo_without_polling, theirs);
        for i in 0..20 {
            ours.send(&Some((i, String::new()))).unwrap();
            let back: (u32, String) = ours.recv_timeout(TIMEOUT).unwrap();
            assert_eq!(back.0, i, "{m:?}");
        }
        ours.send(&None::<(u32, String)>).unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 20, "{m:?}");
    }
    gpuproc::channel::set_max_spin(saved);
}

#[test]
fn a_timeout_shorter_than_the_polling_time_is_kept() {
    // The receive polls for at most its timeout, then reports it, however long max_spin is.
    gpuproc::channel::set_max_spin(Duration::from_millis(100));
    let (a, _b) = Pipe::new().unwrap();
    let q = Queue::<u8>::new().unwrap();
    for timeout in [Duration::from_micros(20), SHORT] {
        let t0 = Instant::now();
        assert!(a.recv_timeout::<u8>(timeout).unwrap_err().is_timeout());
        assert!(q.get_timeout(timeout).unwrap_err().is_timeout());
        assert!(t0.elapsed() >= timeout * 2);
    }
    gpuproc::channel::set_max_spin(gpuproc::channel::MAX_SPIN);
}

fn put_three(q: Queue<(i32, Option<i32>, String)>) {
    for i in 0..3 {
        q.put((i, None, "hello".into())).unwrap();
    }
}

#[test]
fn queue_passed_to_a_child_with_every_start_method() {
    for m in StartMethod::all() {
        let q = Queue::new().unwrap();
        let mut p = start(m, put_three, q.clone());
        for i in 0..3 {
            assert_eq!(
                q.get_timeout(TIMEOUT).unwrap(),
                (i, None, "hello".to_string()),
                "{m:?}"
            );
        }
        p.join_timeout(TIMEOUT).unwrap();
        assert!(q.empty());
        assert!(q.try_get().unwrap_err().is_empty());
    }
}

fn produce((q, id): (Queue<Option<u32>>, u32)) {
    for i in 0..1000 {
        q.put(Some(id * 1000 + i)).unwrap();
    }
}

fn consume(q: Queue<Option<u32>>) -> Vec<u32> {
    let mut got = Vec::new();
    while let Some(v) = q.get_timeout(TIMEOUT).unwrap() {
        got.push(v);
    }
    got
}

#[test]
fn four_producers_four_consumers_each_message_exactly_once() {
    for (m, q) in [
        (StartMethod::ForkServer, Queue::new().unwrap()),
        (StartMethod::Fork, Queue::bounded(64).unwrap()),
    ] {
        let consumers: Vec<_> = (0..4).map(|_| start(m, consume, q.clone())).collect();
        let producers: Vec<_> = (0..4)
            .map(|id| start(m, produce, (q.clone(), id)))
            .collect();
        for mut p in producers {
            p.join_timeout(TIMEOUT).unwrap();
        }
        for _ in 0..4 {
            q.put_timeout(None, TIMEOUT).unwrap();
        }
        let mut all = Vec::new();
        for mut c in consumers {
            all.extend(c.join_timeout(TIMEOUT).unwrap());
        }
        assert_eq!(all.len(), 4000, "{m:?}");
        let set: BTreeSet<u32> = all.into_iter().collect();
        assert_eq!(set, (0..4000).collect(), "{m:?}");
        assert_eq!(q.qsize(), 0);
    }
}

fn worker(q: JoinableQueue<u64>) {
    loop {
        let v = q.get_timeout(TIMEOUT).unwrap();
        if v == u64::MAX {
            q.task_done().unwrap();
            return;
        }
        q.task_done().unwrap();
    }
}

#[test]
fn joinable_queue_join_returns_after_task_done() {
    let q = JoinableQueue::<u64>::new().unwrap();
    for i in 0..100 {
        q.put(i).unwrap();
    }
    // Nobody consumes yet: join waits, and times out.
    assert!(q.join_timeout(SHORT).unwrap_err().is_timeout());
    q.put(u64::MAX).unwrap();
    let mut p = start(StartMethod::ForkServer, worker, q.clone());
    q.join_timeout(TIMEOUT).unwrap();
    assert!(q.empty());
    p.join_timeout(TIMEOUT).unwrap();
    let err = q.task_done().unwrap_err();
    assert!(matches!(err, ChannelError::TaskDoneTooOften), "{err}");
}

#[test]
fn simple_queue_and_simplex_pipe() {
    let q = SimpleQueue::new().unwrap();
    assert!(q.empty());
    q.put("x".to_string()).unwrap();
    assert!(!q.empty());
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), "x");
    assert!(q.try_get().unwrap_err().is_empty());

    let (r, w) = Pipe::simplex().unwrap();
    assert!(r.readable() && !r.writable() && w.writable() && !w.readable());
    let e = r.send(&1).unwrap_err();
    assert!(matches!(e, ChannelError::Unsupported(_)), "{e}");
    assert!(w.recv::<i32>().is_err());
    w.send(&7u8).unwrap();
    assert!(r.poll(TIMEOUT).unwrap());
    assert_eq!(r.recv::<u8>().unwrap(), 7);
    assert!(!r.poll(Duration::ZERO).unwrap());
}

fn big_echo(conn: Connection) {
    let b: Bytes = conn.recv_timeout(TIMEOUT).unwrap();
    let v: Vec<f32> = conn.recv_timeout(TIMEOUT).unwrap();
    conn.send(&b).unwrap();
    conn.send(&v).unwrap();
    let raw = conn.recv_bytes_timeout(TIMEOUT).unwrap();
    conn.send_bytes(&raw).unwrap();
}

#[test]
fn large_payloads_through_shared_memory() {
    let bytes = Bytes((0..16 << 20).map(|i: u32| (i % 251) as u8).collect());
    let floats: Vec<f32> = (0..1_000_000).map(|i| i as f32 * 0.5).collect();
    for m in StartMethod::all() {
        let (ours, theirs) = Pipe::new().unwrap();
        let mut p = start(m, big_echo, theirs);
        ours.send(&bytes).unwrap();
        ours.send(&floats).unwrap();
        ours.send_bytes(&bytes[..100_000]).unwrap();
        assert_eq!(ours.recv_timeout::<Bytes>(TIMEOUT).unwrap(), bytes);
        assert_eq!(ours.recv_timeout::<Vec<f32>>(TIMEOUT).unwrap(), floats);
        assert_eq!(ours.recv_bytes_timeout(TIMEOUT).unwrap(), &bytes[..100_000]);
        p.join_timeout(TIMEOUT).unwrap();
    }
    let q = Queue::<Bytes>::bounded(2).unwrap();
    q.put(bytes.clone()).unwrap();
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), bytes);
}

#[test]
fn handles_travel_inside_messages() {
    let (a, b) = Pipe::new().unwrap();
    let (c, d) = Pipe::new().unwrap();
    let q = Queue::<String>::new().unwrap();
    a.send(&(d, q.clone())).unwrap();
    let (d2, q2): (Connection, Queue<String>) = b.recv_timeout(TIMEOUT).unwrap();
    c.send(&"through the sent end").unwrap();
    assert_eq!(
        d2.recv_timeout::<String>(TIMEOUT).unwrap(),
        "through the sent end"
    );
    q2.put("via the sent queue".into()).unwrap();
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), "via the sent queue");
    // A handle inside a payload large enough to go through shared memory, on a pipe and on
    // a queue.
    let big = Bytes(vec![5u8; 3 << 20]);
    a.send(&(big.clone(), q.clone())).unwrap();
    let (got, q3): (Bytes, Queue<String>) = b.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(got, big);
    q3.put("after a large message".into()).unwrap();
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), "after a large message");
    let carrier = Queue::<(Bytes, Queue<String>)>::new().unwrap();
    carrier.put((big.clone(), q.clone())).unwrap();
    let (got, q4) = carrier.get_timeout(TIMEOUT).unwrap();
    assert_eq!(got, big);
    q4.put("through a queue".into()).unwrap();
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), "through a queue");
}

fn sit(conn: Connection) {
    // Holds its end without reading until it is killed.
    let _keep = conn;
    support::block_forever()
}

#[test]
fn a_receiver_that_dies_with_messages_in_flight_disconnects_the_sender() {
    for m in StartMethod::all() {
        let (ours, theirs) = Pipe::new().unwrap();
        let mut p = start(m, sit, theirs);
        for i in 0..100u32 {
            ours.send(&i).unwrap();
        }
        p.kill().unwrap();
        assert!(p.join_timeout(TIMEOUT).is_err());
        drop(p);
        let err = ours.send_timeout(&1u32, TIMEOUT).unwrap_err();
        assert!(err.is_disconnected(), "{m:?}: {err}");
        assert!(ours
            .recv_timeout::<u32>(TIMEOUT)
            .unwrap_err()
            .is_disconnected());
        assert!(ours.poll(Duration::ZERO).unwrap());
    }
}

#[test]
fn peer_closed_and_timeouts() {
    let (a, b) = Pipe::new().unwrap();
    assert!(a.try_recv::<u8>().unwrap_err().is_empty());
    let t0 = Instant::now();
    let err = a.recv_timeout::<u8>(SHORT).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t0.elapsed() >= SHORT);
    assert!(err.to_string().contains("timed out"));
    b.send(&5u8).unwrap();
    b.close();
    // What was sent before closing is still delivered, then the end shows.
    assert_eq!(a.recv_timeout::<u8>(TIMEOUT).unwrap(), 5);
    let err = a.recv_timeout::<u8>(TIMEOUT).unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    assert!(a.send(&1u8).unwrap_err().is_disconnected());
}

#[test]
fn a_full_bounded_queue_with_no_consumer_times_out() {
    let q = Queue::<u32>::bounded(3).unwrap();
    assert_eq!(q.maxsize(), Some(3));
    for i in 0..3 {
        q.try_put(i).unwrap();
    }
    assert!(q.full());
    assert_eq!(q.qsize(), 3);
    let err = q.try_put(9).unwrap_err();
    assert!(err.is_full(), "{err}");
    assert_eq!(err.into_inner(), 9);
    let err = q.put_timeout(10, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.into_inner(), 10);
    assert_eq!(q.get_timeout(TIMEOUT).unwrap(), 0);
    q.put_timeout(3, TIMEOUT).unwrap();
    assert!(Queue::<u32>::bounded(0).is_err());
}

fn hold_queue(q: Queue<u32>) {
    let _keep = q;
    support::block_forever()
}

/// Puts a large item, stopping for ever (test hook) once the put holds its slot and task.
fn put_and_stall(q: JoinableQueue<Bytes>) {
    gpuproc::channel::stall_puts_after_taking_slot();
    let _ = q.put(Bytes(vec![1; 200_000]));
}

fn put_and_stall_plain(q: Queue<Bytes>) {
    gpuproc::channel::stall_puts_after_taking_slot();
    let _ = q.put(Bytes(vec![1; 200_000]));
}

/// Waits (checking often) until `cond` holds; false if `TIMEOUT` passed first.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn a_producer_killed_inside_put_gives_back_its_slot_and_task() {
    for m in StartMethod::all() {
        // A bounded queue: the slot the killed put held comes back.
        let q = Queue::<Bytes>::bounded(1).unwrap();
        let mut p = start(m, put_and_stall_plain, q.clone());
        assert!(
            eventually(|| q.full()),
            "{m:?}: the put never took its slot"
        );
        p.kill().unwrap();
        // Not joined yet: with Fork the producer is a zombie of this process.
        q.put_timeout(Bytes(vec![2; 10]), TIMEOUT).unwrap();
        assert_eq!(q.get_timeout(TIMEOUT).unwrap().0, vec![2; 10], "{m:?}");
        assert!(p.join_timeout(TIMEOUT).is_err(), "{m:?}");

        // A joinable queue, bounded and not: join() does not wait for the lost item.
        for jq in [
            JoinableQueue::<Bytes>::new().unwrap(),
            JoinableQueue::<Bytes>::bounded(1).unwrap(),
        ] {
            let mut p = start(m, put_and_stall, jq.clone());
            assert!(
                eventually(|| jq.join_timeout(Duration::ZERO).is_err()),
                "{m:?}: the put never counted its task"
            );
            p.kill().unwrap();
            jq.join_timeout(TIMEOUT).unwrap();
            jq.put_timeout(Bytes(vec![3; 10]), TIMEOUT).unwrap();
            assert_eq!(jq.get_timeout(TIMEOUT).unwrap().0, vec![3; 10], "{m:?}");
            jq.task_done().unwrap();
            jq.join_timeout(TIMEOUT).unwrap();
            assert!(jq
                .task_done()
                .unwrap_err()
                .to_string()
                .contains("task_done"));
            assert!(p.join_timeout(TIMEOUT).is_err(), "{m:?}");
        }
    }
}

#[test]
fn a_bounded_queue_whose_consumer_died_times_out_instead_of_hanging() {
    let q = Queue::<u32>::bounded(2).unwrap();
    let mut p = start(StartMethod::ForkServer, hold_queue, q.clone());
    q.put(1).unwrap();
    q.put(2).unwrap();
    p.kill().unwrap();
    assert!(p.join_timeout(TIMEOUT).is_err());
    let err = q.put_timeout(3, SHORT).unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[test]
fn messages_over_max_message_size_are_refused_and_the_pipe_stays_usable() {
    let (a, b) = Pipe::new().unwrap();
    let a = a.with_max_message_size(1000);
    let err = a.send(&Bytes(vec![0; 2000])).unwrap_err();
    assert!(err.is_too_large(), "{err}");
    assert!(err.to_string().contains("max_message_size"), "{err}");
    a.send(&Bytes(vec![1; 10])).unwrap();
    assert_eq!(b.recv_timeout::<Bytes>(TIMEOUT).unwrap().0, vec![1; 10]);

    // The receiving side enforces its own limit, for inline and shared-memory messages.
    let (a, b) = Pipe::new().unwrap();
    let b = b.with_max_message_size(1000);
    a.send(&Bytes(vec![2; 2000])).unwrap();
    a.send(&Bytes(vec![3; 200_000])).unwrap();
    a.send(&Bytes(vec![4; 10])).unwrap();
    for _ in 0..2 {
        let err = b.recv_timeout::<Bytes>(TIMEOUT).unwrap_err();
        assert!(err.is_too_large(), "{err}");
    }
    assert_eq!(b.recv_timeout::<Bytes>(TIMEOUT).unwrap().0, vec![4; 10]);
}

/// Writes one raw datagram (and optionally a descriptor) onto a connection's socket.
fn send_raw(conn: &Connection, bytes: &[u8], fd: Option<i32>) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(4) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the fields set point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control holds room for one header with one descriptor.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        }
    }
    // SAFETY: `msg` describes valid buffers; the socket is open.
    let n = unsafe { libc::sendmsg(conn.as_fd().as_raw_fd(), &msg, 0) };
    assert_eq!(n, bytes.len() as isize);
}

#[test]
fn an_empty_datagram_is_malformed_not_the_end_of_the_pipe() {
    let (a, b) = Pipe::new().unwrap();
    send_raw(&a, &[], None);
    let err = b.recv_timeout::<u32>(TIMEOUT).unwrap_err();
    assert!(err.is_malformed(), "{err}");
    assert!(!err.is_disconnected(), "{err}");
    // Blocking receives (which may poll first) and looks without waiting read it the same.
    send_raw(&a, &[], None);
    assert!(b.recv::<u32>().unwrap_err().is_malformed());
    send_raw(&a, &[], None);
    assert!(b.try_recv::<u32>().unwrap_err().is_malformed());
    a.send(&7u32).unwrap();
    assert_eq!(b.recv_timeout::<u32>(TIMEOUT).unwrap(), 7);
    // Closed after an empty datagram and a message: both are read before the end.
    send_raw(&a, &[], None);
    a.send(&8u32).unwrap();
    drop(a);
    assert!(b.recv_timeout::<u32>(TIMEOUT).unwrap_err().is_malformed());
    assert_eq!(b.recv_timeout::<u32>(TIMEOUT).unwrap(), 8);
    assert!(b
        .recv_timeout::<u32>(TIMEOUT)
        .unwrap_err()
        .is_disconnected());
    assert!(b.recv::<u32>().unwrap_err().is_disconnected());
}

#[test]
fn malformed_frames_on_the_wire_are_errors_and_the_pipe_stays_usable() {
    let (a, b) = Pipe::new().unwrap();
    let (pipe_r, _pipe_w) = support::pipe();
    let mut huge = vec![0xA2];
    huge.extend_from_slice(&1000u64.to_le_bytes());
    let cases: Vec<(Vec<u8>, Option<i32>)> = vec![
        (vec![0x00, 1, 2, 3], None),          // unknown tag
        (vec![0xA2, 1, 2], None),             // short shared-memory header
        (huge.clone(), None),                 // shared-memory message without its memfd
        (huge, Some(pipe_r.as_raw_fd())),     // ... with a descriptor that is no memfd
        (vec![0xA1, 0xff, 0xff, 0xff], None), // payload that is not a (u32, String)
    ];
    for (bytes, fd) in &cases {
        send_raw(&a, bytes, *fd);
        let err = b.recv_timeout::<(u32, String)>(TIMEOUT).unwrap_err();
        assert!(err.is_malformed(), "{bytes:?}: {err}");
    }
    // A value of another type is a decode error naming the type asked for.
    a.send(&1u8).unwrap();
    let err = b.recv_timeout::<String>(TIMEOUT).unwrap_err();
    assert!(matches!(err, ChannelError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("String"), "{err}");
    a.send(&(1u32, "fine".to_string())).unwrap();
    assert_eq!(
        b.recv_timeout::<(u32, String)>(TIMEOUT).unwrap(),
        (1, "fine".to_string())
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary bytes, and arbitrary truncations of valid messages, decode to an error (or
    /// a value), never a crash; the connection keeps working.
    #[test]
    fn arbitrary_bytes_on_the_wire_never_crash(
        junk in proptest::collection::vec(any::<u8>(), 1..200),
        text in ".{0,30}",
        cut in any::<proptest::sample::Index>(),
    ) {
        let (a, b) = Pipe::new().unwrap();
        a.send_bytes(&junk).unwrap();
        let _ = b.recv_timeout::<(u32, Option<String>, Vec<i16>)>(TIMEOUT);
        send_raw(&a, &junk, None);
        let _ = b.recv_timeout::<(u32, Option<String>, Vec<i16>)>(TIMEOUT);

        let value = (7u32, Some(text), vec![-1i16, 2]);
        a.send(&value).unwrap();
        let frame = b.recv_bytes_timeout(TIMEOUT).unwrap();
        let at = cut.index(frame.len());
        a.send_bytes(&frame[..at]).unwrap();
        prop_assert!(b.recv_timeout::<(u32, Option<String>, Vec<i16>)>(TIMEOUT).is_err());
        a.send(&value).unwrap();
        prop_assert_eq!(b.recv_timeout::<(u32, Option<String>, Vec<i16>)>(TIMEOUT).unwrap(), value);
    }
}

#[test]
fn no_descriptors_leak() {
    let before = support::open_fds();
    for _ in 0..20 {
        let (a, b) = Pipe::new().unwrap();
        let q = Queue::<Bytes>::new().unwrap();
        a.send(&Bytes(vec![1; 100_000])).unwrap();
        q.put(b.recv_timeout(TIMEOUT).unwrap()).unwrap();
        a.send(&q).unwrap();
        let q2: Queue<Bytes> = b.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(q2.get_timeout(TIMEOUT).unwrap().len(), 100_000);
    }
    // Other tests run in parallel and open descriptors too: allow some slack, not 20x.
    assert!(support::open_fds() < before + 20, "descriptors leaked");
}

#[test]
fn example_exchange_queue_prints_pythons_line() {
    let out = support::run_example("exchange_queue");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[42, None, 'hello']\n"
    );
}

#[test]
fn example_exchange_pipe_prints_pythons_line() {
    let out = support::run_example("exchange_pipe");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[42, None, 'hello']\n"
    );
}

/// `len` bytes that differ with `seed` and along the buffer (built a block at a time, so
/// that children that build them end soon even in a debug build: a child forked meanwhile
/// holds copies of other tests' descriptors until it ends).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..=255u8)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(block.len());
        v.extend_from_slice(&block[..n]);
    }
    v
}

fn put_big((q, conn, seed): (Queue<Bytes>, Connection, u8)) {
    q.put_bytes(&pattern(seed, 16 << 20)).unwrap();
    q.put(Bytes(pattern(seed, 100))).unwrap();
    conn.send_bytes(&pattern(seed.wrapping_add(1), 16 << 20))
        .unwrap();
}

#[test]
fn sixteen_mib_received_as_shared_bytes_with_every_start_method() {
    for (i, m) in StartMethod::all().into_iter().enumerate() {
        let q = Queue::<Bytes>::new().unwrap();
        let (ours, theirs) = Pipe::new().unwrap();
        let seed = i as u8 * 10;
        let mut p = start(m, put_big, (q.clone(), theirs, seed));
        let got: SharedBytes = q.get_shared_timeout(TIMEOUT).unwrap();
        assert!(got.is_shared(), "{m:?}");
        assert!(*got == *pattern(seed, 16 << 20), "{m:?}");
        // A small item comes in an owned buffer.
        let small = q.get_shared_timeout(TIMEOUT).unwrap();
        assert!(!small.is_shared(), "{m:?}");
        assert_eq!(&*small, &pattern(seed, 100)[..], "{m:?}");
        let got = ours.recv_bytes_shared_timeout(TIMEOUT).unwrap();
        assert!(got.is_shared(), "{m:?}");
        assert!(*got == *pattern(seed + 1, 16 << 20), "{m:?}");
        p.join_timeout(TIMEOUT).unwrap();
    }
}

#[test]
fn shared_bytes_and_bytes_items_mix_on_one_queue() {
    let q = Queue::<Bytes>::new().unwrap();
    q.put(Bytes(pattern(1, 1 << 20))).unwrap();
    q.put_bytes(&pattern(2, 1 << 20)).unwrap();
    assert_eq!(
        q.get_shared_timeout(TIMEOUT).unwrap().to_vec(),
        pattern(1, 1 << 20)
    );
    assert_eq!(q.get_timeout(TIMEOUT).unwrap().0, pattern(2, 1 << 20));
    assert!(q.try_get_shared().unwrap_err().is_empty());
}

/// Sends `n` messages of 1 MiB, each after the receiver has said it dropped the previous.
fn send_after_acks((conn, n): (Connection, u8)) {
    for i in 0..n {
        conn.send_bytes(&pattern(i, 1 << 20)).unwrap();
        let _: () = conn.recv_timeout(TIMEOUT).unwrap();
    }
}

#[test]
fn a_held_shared_buffer_is_never_overwritten() {
    for m in StartMethod::all() {
        let (ours, theirs) = Pipe::new().unwrap();
        let n = 20;
        let mut p = start(m, send_after_acks, (theirs, n));
        let held = ours.recv_bytes_shared_timeout(TIMEOUT).unwrap();
        assert!(held.is_shared());
        ours.send(&()).unwrap();
        // The sender now reuses the memory of every message but the held one.
        for i in 1..n {
            let got = ours.recv_bytes_shared_timeout(TIMEOUT).unwrap();
            assert!(*got == *pattern(i, 1 << 20), "{m:?}");
            drop(got);
            ours.send(&()).unwrap();
        }
        p.join_timeout(TIMEOUT).unwrap();
        assert!(
            *held == *pattern(0, 1 << 20),
            "{m:?}: a held buffer changed"
        );
    }
}

/// The inodes of the message memfds this process has open.
fn open_memfds() -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let link = std::fs::read_link(&path).ok()?;
            link.to_string_lossy()
                .contains("gpuproc-message")
                .then(|| std::fs::metadata(&path).ok().map(|m| m.ino()))?
        })
        .collect()
}

/// Sends and receives `n` messages through a queue in this (child) process, holding one
/// received buffer throughout; returns the most message memfds open at once, and how many
/// different ones were open over all.
fn memfds_over_messages(n: u32) -> (usize, usize) {
    let q = Queue::<Bytes>::new().unwrap();
    q.put_bytes(&pattern(0, 1 << 20)).unwrap();
    let held = q.get_shared_timeout(TIMEOUT).unwrap();
    let (mut most, mut seen) = (0, BTreeSet::new());
    for i in 0..n {
        q.put_bytes(&pattern(i as u8, 1 << 20)).unwrap();
        let got = q.get_shared_timeout(TIMEOUT).unwrap();
        assert!(got.is_shared() && got[1] == pattern(i as u8, 2)[1]);
        let open = open_memfds();
        most = most.max(open.len());
        seen.extend(open);
        drop(got);
    }
    assert!(*held == *pattern(0, 1 << 20));
    (most, seen.len())
}

#[test]
fn dropped_shared_buffers_are_reused_not_piled_up() {
    // In a child: other tests in this process open memfds too.
    let mut p = start(StartMethod::Spawn, memfds_over_messages, 100);
    let (most, seen) = p.join_timeout(TIMEOUT).unwrap();
    // The held buffer and the one reused for every other message (each open in the
    // sender's pool and, while received, in the receiver): not one per message.
    assert!(most <= 4, "{most} memfds open at once");
    assert!(seen <= 3, "{seen} memfds used for 100 messages");
}

#[test]
fn duration_max_timeouts_mean_no_limit() {
    let (a, b) = Pipe::new().unwrap();
    a.send_timeout(&1u32, Duration::MAX).unwrap();
    assert!(b.poll(Duration::MAX).unwrap());
    assert_eq!(b.recv_timeout::<u32>(Duration::MAX).unwrap(), 1);
    a.send_bytes_timeout(b"raw", Duration::MAX).unwrap();
    assert_eq!(b.recv_bytes_timeout(Duration::MAX).unwrap(), b"raw");
    a.send_bytes_timeout(&[5; 100_000], Duration::MAX).unwrap();
    assert_eq!(
        &*b.recv_bytes_shared_timeout(Duration::MAX).unwrap(),
        &[5; 100_000][..]
    );
    // A receive that waits: the message comes from another thread.
    let t = std::thread::spawn(move || a.send(&2u32).unwrap());
    assert_eq!(b.recv_timeout::<u32>(Duration::MAX).unwrap(), 2);
    t.join().unwrap();

    let q = Queue::<u32>::bounded(1).unwrap();
    q.put_timeout(3, Duration::MAX).unwrap();
    assert_eq!(q.get_timeout(Duration::MAX).unwrap(), 3);
    let q2 = q.clone();
    let t = std::thread::spawn(move || q2.put_timeout(4, Duration::MAX).unwrap());
    assert_eq!(q.get_timeout(Duration::MAX).unwrap(), 4);
    t.join().unwrap();
    let bq = Queue::<Bytes>::new().unwrap();
    bq.put_bytes_timeout(&[6; 100_000], Duration::MAX).unwrap();
    assert_eq!(
        &*bq.get_shared_timeout(Duration::MAX).unwrap(),
        &[6; 100_000][..]
    );
    let sq = SimpleQueue::<u32>::new().unwrap();
    sq.put_timeout(7, Duration::MAX).unwrap();
    assert_eq!(sq.get_timeout(Duration::MAX).unwrap(), 7);
    let jq = JoinableQueue::<u32>::new().unwrap();
    jq.put_timeout(8, Duration::MAX).unwrap();
    assert_eq!(jq.get_timeout(Duration::MAX).unwrap(), 8);
    jq.task_done().unwrap();
    jq.join_timeout(Duration::MAX).unwrap();
}
