//! Pipes and queues: gpuproc against a raw Unix socket pair, memcpy, and Python's
//! `multiprocessing`, in one run, ratios printed.
//!
//! 1. Round-trip latency of a small message parent ↔ child: `gpuproc::channel::Pipe`
//!    against a raw `UnixStream` ping-pong (8 bytes) and Python's `multiprocessing.Pipe`.
//!    gpuproc is measured twice: as it comes (a blocking receive polls for up to
//!    `max_spin` before it sleeps) and with polling off (`set_max_spin(0)`, in both
//!    processes), which sleeps in the kernel like the raw socket and Python do.
//! 2. Throughput of 16 MiB messages child → parent through `gpuproc::channel::Queue<Bytes>`
//!    (the child puts one buffer again and again, as the Python anchor puts one `bytes`)
//!    against single-threaded memcpy bandwidth and Python's `multiprocessing.Queue`; and
//!    the same items got as `SharedBytes` (`Queue::get_shared`: read in place in the
//!    sender's shared memory, so one copy in all instead of two; the parent checks the
//!    length and the first and last bytes, it does not read the whole payload).
//!
//! 3. The round trips of 1. again with every CPU busy: one busy-looping thread per CPU
//!    this process may use runs for the duration of that part (and is stopped after), as
//!    in a pool doing real work. There a receive that polls would take CPU time from the
//!    process it waits for; gpuproc notices the load and sleeps at once.
//!
//! Each measurement is taken in [`ROUNDS`] rounds (after a warm-up) and the median round is
//! reported, for gpuproc, the baselines and Python alike, so that a burst of load from
//! other processes on a shared machine does not decide the result.
//!
//! Usage: `cargo run --release -p gpuproc-benchmarks --bin bench_channel [ROUND_TRIPS] [MESSAGES]`
//! (Python from `$GPUPROC_PYTHON`, default `.venv/bin/python`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use gpuproc::channel::{Bytes, Connection, Pipe, Queue};
use gpuproc::Process;
use serde::{Deserialize, Serialize, Serializer};

const MIB: usize = 16;
const WARM_UP: u64 = 100;
/// Rounds per measurement; the median round is reported.
const ROUNDS: u64 = 8;

/// The median of some samples.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A raw socket passed to the child through gpuproc's descriptor passing.
#[derive(Serialize, Deserialize)]
struct Raw(
    #[serde(
        serialize_with = "ser_fd",
        deserialize_with = "gpuproc::deserialize_fd"
    )]
    OwnedFd,
);

fn ser_fd<S: Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    gpuproc::serialize_fd(fd.as_fd(), s)
}

fn pipe_echo((conn, n, spin): (Connection, u64, bool)) {
    if !spin {
        gpuproc::channel::set_max_spin(Duration::ZERO);
    }
    for _ in 0..n {
        let v: u64 = conn.recv().expect("recv");
        conn.send(&v).expect("send");
    }
}

fn raw_echo((raw, n): (Raw, u64)) {
    let mut s = UnixStream::from(raw.0);
    let mut buf = [0u8; 8];
    for _ in 0..n {
        s.read_exact(&mut buf).expect("read");
        s.write_all(&buf).expect("write");
    }
}

/// Puts one 16 MiB payload `n` times, as the Python anchor does (`q.put(payload)` with
/// the same `bytes` object): `put_bytes` borrows the buffer, so the payload is built
/// once, outside the timed region, and each put copies it into shared memory once.
fn producer((q, n): (Queue<Bytes>, u64)) {
    let payload = vec![7u8; MIB << 20];
    for _ in 0..n {
        q.put_bytes(&payload).expect("put");
    }
}

/// The median round trip (µs) of `trips` (in [`ROUNDS`] rounds) through a `Pipe`, with
/// receives that poll briefly before they sleep (the default) or that sleep at once.
fn pipe_rtt(trips: u64, spin: bool) -> f64 {
    let per_round = (trips / ROUNDS).max(1);
    let saved = gpuproc::channel::max_spin();
    if !spin {
        gpuproc::channel::set_max_spin(Duration::ZERO);
    }
    let (ours, theirs) = Pipe::new().expect("pipe");
    let mut p = Process::new(pipe_echo, (theirs, per_round * ROUNDS + WARM_UP, spin));
    p.start().expect("start");
    for i in 0..WARM_UP {
        ours.send(&i).expect("send");
        let _: u64 = ours.recv().expect("recv");
    }
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..per_round {
            ours.send(&i).expect("send");
            let back: u64 = ours.recv().expect("recv");
            assert_eq!(back, i);
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e6 / per_round as f64);
    }
    p.join().expect("join");
    gpuproc::channel::set_max_spin(saved);
    median(rounds)
}

/// The median round trip (µs) of 8 bytes through a raw `UnixStream` pair.
fn raw_rtt(trips: u64) -> f64 {
    let per_round = (trips / ROUNDS).max(1);
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut p = Process::new(raw_echo, (Raw(theirs.into()), per_round * ROUNDS + WARM_UP));
    p.start().expect("start");
    let mut buf = [0u8; 8];
    for i in 0..WARM_UP {
        ours.write_all(&i.to_le_bytes()).expect("write");
        ours.read_exact(&mut buf).expect("read");
    }
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..per_round {
            ours.write_all(&i.to_le_bytes()).expect("write");
            ours.read_exact(&mut buf).expect("read");
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e6 / per_round as f64);
    }
    p.join().expect("join");
    median(rounds)
}

/// The median MiB/s of 16 MiB `Bytes` messages from a child through a queue (`messages`
/// in [`ROUNDS`] rounds).
fn queue_mib_s(messages: u64) -> f64 {
    let per_round = (messages / ROUNDS).max(1);
    let q = Queue::<Bytes>::new().expect("queue");
    let mut p = Process::new(producer, (q.clone(), per_round * ROUNDS + 1));
    p.start().expect("start");
    q.get().expect("warm-up get");
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..per_round {
            assert_eq!(q.get().expect("get").len(), MIB << 20);
        }
        rounds.push((per_round as usize * MIB) as f64 / t.elapsed().as_secs_f64());
    }
    p.join().expect("join");
    median(rounds)
}

/// [`queue_mib_s`], with the items got as `SharedBytes` (no copy out of shared memory).
fn queue_shared_mib_s(messages: u64) -> f64 {
    let per_round = (messages / ROUNDS).max(1);
    let q = Queue::<Bytes>::new().expect("queue");
    let mut p = Process::new(producer, (q.clone(), per_round * ROUNDS + 1));
    p.start().expect("start");
    drop(q.get_shared().expect("warm-up get"));
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..per_round {
            let got = q.get_shared().expect("get");
            assert_eq!(got.len(), MIB << 20);
            assert_eq!((got[0], got[got.len() - 1]), (7, 7));
        }
        rounds.push((per_round as usize * MIB) as f64 / t.elapsed().as_secs_f64());
    }
    p.join().expect("join");
    median(rounds)
}

/// The median MiB/s of copying 16 MiB buffers (into a buffer that is reused, so no page
/// faults), in as many copies and rounds as [`queue_mib_s`] receives.
fn memcpy_mib_s(messages: u64) -> f64 {
    let per_round = (messages / ROUNDS).max(1);
    let src = vec![7u8; MIB << 20];
    let mut dst = vec![0u8; MIB << 20];
    dst.copy_from_slice(&src);
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..per_round {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst)[0] = i as u8;
        }
        rounds.push((per_round as usize * MIB) as f64 / t.elapsed().as_secs_f64());
    }
    median(rounds)
}

/// One busy-looping thread per CPU this process may use, until dropped.
struct Hogs {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    fn start() -> Hogs {
        use std::sync::atomic::{AtomicBool, Ordering};
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    }
                })
            })
            .collect();
        Hogs { stop, threads }
    }

    fn count(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn python(trips: u64, messages: u64) -> Option<(f64, f64)> {
    let script = gpuproc_benchmarks::workspace_root().join("benchmarks/channel/bench_channel.py");
    let args = [trips, messages, MIB as u64, ROUNDS].map(|a| a.to_string());
    let v: serde_json::Value = gpuproc_benchmarks::run_python_json(&script, &args)
        .map_err(|e| eprintln!("no Python figures: {e}"))
        .ok()?;
    Some((v["pipe_rtt_us"].as_f64()?, v["queue_mib_s"].as_f64()?))
}

fn main() {
    gpuproc::init();
    let mut args = std::env::args().skip(1);
    let trips: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let messages: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);

    let pipe = pipe_rtt(trips, true);
    let pipe_sleeping = pipe_rtt(trips, false);
    let raw = raw_rtt(trips);
    let queue = queue_mib_s(messages);
    let shared = queue_shared_mib_s(messages);
    let memcpy = memcpy_mib_s(messages);
    let py = python(trips, messages);
    // The round trips again with every CPU busy (fewer of them: each is slower).
    let loaded_trips = (trips / 4).max(ROUNDS);
    let hogs = Hogs::start();
    let n_hogs = hogs.count();
    let loaded_pipe = pipe_rtt(loaded_trips, true);
    let loaded_sleeping = pipe_rtt(loaded_trips, false);
    let loaded_raw = raw_rtt(loaded_trips);
    let loaded_py = python(loaded_trips, ROUNDS).map(|(rtt, _)| rtt);
    drop(hogs);

    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("(each figure: the median of {ROUNDS} rounds)");
    println!("round trip, small message ({trips} trips)       µs/trip   /raw   Python/it");
    let rtt_row = |name: &str, us: f64| {
        let py = py.map_or("-".to_string(), |(p, _)| format!("{:.1}x", p / us));
        println!("  {name:<38} {us:>9.2}  {:>5.2}x  {py:>8}", us / raw);
    };
    rtt_row("gpuproc Pipe (polls ≤ max_spin first)", pipe);
    rtt_row("gpuproc Pipe, max_spin 0 (sleeps)", pipe_sleeping);
    rtt_row("raw UnixStream socketpair (sleeps)", raw);
    if let Some((py_rtt, _)) = py {
        rtt_row("Python multiprocessing.Pipe", py_rtt);
    }
    println!();
    println!(
        "round trip, every CPU busy ({n_hogs} CPU hogs, {loaded_trips} trips)  µs/trip   /raw   Python/it"
    );
    let loaded_row = |name: &str, us: f64| {
        let py = loaded_py.map_or("-".to_string(), |p| format!("{:.1}x", p / us));
        println!("  {name:<38} {us:>9.2}  {:>5.2}x  {py:>8}", us / loaded_raw);
    };
    loaded_row("gpuproc Pipe (default)", loaded_pipe);
    loaded_row("gpuproc Pipe, max_spin 0 (sleeps)", loaded_sleeping);
    loaded_row("raw UnixStream socketpair (sleeps)", loaded_raw);
    if let Some(py_rtt) = loaded_py {
        loaded_row("Python multiprocessing.Pipe", py_rtt);
    }
    println!();
    println!(
        "throughput, {MIB} MiB messages child → parent ({messages})   MiB/s  /memcpy  /Python"
    );
    let mib_row = |name: &str, v: f64| {
        let py = py.map_or("-".to_string(), |(_, p)| format!("{:.1}x", v / p));
        println!(
            "  {name:<38} {v:>9.0}  {:>5.0}%  {py:>8}",
            100.0 * v / memcpy
        );
    };
    mib_row("gpuproc Queue<Bytes>, get", queue);
    mib_row("gpuproc Queue<Bytes>, get_shared", shared);
    mib_row("memcpy (one thread, reused buffers)", memcpy);
    if let Some((_, py_q)) = py {
        mib_row("Python multiprocessing.Queue", py_q);
    }
    println!();
    println!("Targets:");
    println!(
        "  Pipe round trip <= 1.5x raw socketpair              {:.2}x (sleeping: {:.2}x) -> {}",
        pipe / raw,
        pipe_sleeping / raw,
        verdict(pipe / raw <= 1.5)
    );
    if let Some((py_rtt, py_q)) = py {
        println!(
            "  Pipe round trip >= 5x better than Python Pipe       {:.1}x (sleeping: {:.1}x) -> {}",
            py_rtt / pipe,
            py_rtt / pipe_sleeping,
            verdict(py_rtt / pipe >= 5.0)
        );
        println!(
            "  Queue 16 MiB >= 5x Python Queue                     {:.1}x -> {}",
            queue / py_q,
            verdict(queue / py_q >= 5.0)
        );
    }
    println!(
        "  Loaded: default Pipe no slower than sleeping      {:.2}x of max_spin 0 -> {}",
        loaded_pipe / loaded_sleeping,
        verdict(loaded_pipe <= loaded_sleeping * 1.1)
    );
    println!(
        "  Queue 16 MiB >= 50% of memcpy                       {:.0}% -> {}",
        100.0 * queue / memcpy,
        verdict(queue / memcpy >= 0.5)
    );
}
