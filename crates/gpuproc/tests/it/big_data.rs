//! Large arguments and results: bulk encoding, shared-memory transport, bounded memory.

use std::collections::BTreeSet;

use gpuproc::channel::Queue;
use gpuproc::{Pipe, Pool, StartMethod};
use serde::{Deserialize, Serialize};

use crate::support::{start, TIMEOUT};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Batch {
    ids: Vec<u32>,
    x: Vec<f32>,
    name: String,
}

fn batch(i: usize, floats: usize) -> Batch {
    Batch {
        ids: (0..floats as u32 / 4).map(|k| k * 3 + i as u32).collect(),
        x: (0..floats)
            .map(|k| (k % 1000) as f32 * 0.5 + i as f32)
            .collect(),
        name: format!("batch {i}"),
    }
}

/// Returns the batch reversed and scaled: a result as large as the argument.
fn transform(mut b: Batch) -> Batch {
    b.ids.reverse();
    b.x.iter_mut().for_each(|v| *v *= 2.0);
    b.name.push('!');
    b
}

#[test]
fn large_and_small_arguments_and_results_round_trip_in_one_map() {
    // Sizes around the point where a chunk's bytes move to shared memory (256 KiB), far
    // past it, and empty; in chunks of one and of three (mixing large and small).
    let floats = [0, 1, 60_000, 66_000, 1 << 20, 3 << 20, 10, 70_000];
    let items: Vec<Batch> = floats
        .iter()
        .enumerate()
        .map(|(i, &n)| batch(i, n))
        .collect();
    let want: Vec<Batch> = items.iter().cloned().map(transform).collect();
    for method in [StartMethod::Spawn, StartMethod::ForkServer] {
        let pool = Pool::builder()
            .processes(2)
            .start_method(method)
            .build()
            .unwrap();
        for chunksize in [1, 3] {
            let got = pool
                .map_chunksize(transform, items.clone(), chunksize)
                .unwrap();
            assert!(got == want, "{method:?}, chunks of {chunksize}");
        }
        let mut unordered: Vec<Batch> = pool
            .imap_unordered(transform, items.clone())
            .map(Result::unwrap)
            .collect();
        unordered.sort_by_key(|b| b.name.clone());
        let mut sorted = want.clone();
        sorted.sort_by_key(|b| b.name.clone());
        assert!(unordered == sorted, "{method:?}, unordered");
        pool.close();
        pool.join().unwrap();
    }
}

#[test]
fn vectors_of_numbers_through_queues_pipes_and_processes() {
    let v: Vec<f64> = (0..(1 << 20)).map(|k| k as f64 / 3.0).collect();
    let q: Queue<(Vec<f64>, Vec<bool>, Vec<i64>)> = Queue::new().unwrap();
    q.put((v.clone(), vec![true, false], vec![-5i64; 1000]))
        .unwrap();
    let (a, b, c): (Vec<f64>, Vec<bool>, Vec<i64>) = q.get_timeout(TIMEOUT).unwrap();
    assert!(a == v && b == [true, false] && c == vec![-5; 1000]);

    let (tx, rx) = Pipe::new().unwrap();
    tx.send(&v[..1000]).unwrap();
    assert_eq!(
        rx.recv_timeout::<Box<[f64]>>(TIMEOUT).unwrap()[..],
        v[..1000]
    );

    fn negate(v: Vec<f64>) -> Vec<f64> {
        v.into_iter().map(|x| -x).collect()
    }
    let mut p = start(StartMethod::Spawn, negate, v.clone());
    let back = p.join_timeout(TIMEOUT).unwrap();
    assert!(back.iter().zip(&v).all(|(x, y)| *x == -*y) && back.len() == v.len());
}

/// The inodes of the argument memfds this process has open.
fn task_memfds() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            let link = link.to_string_lossy().into_owned();
            link.contains("gpuproc-task-args").then_some(link)
        })
        .collect()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Open descriptors, and argument memfds among them.
type Counts = (usize, usize);

/// A task that kills its own worker when asked, after its 64 MiB argument has arrived.
fn sum_or_die((v, die): (Vec<u8>, bool)) -> u64 {
    if die {
        // SAFETY: a plain system call on this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    v.iter().map(|&x| u64::from(x)).sum()
}

/// In a child process (other tests open descriptors too): a pool whose worker is killed
/// while a 64 MiB argument is in flight; returns each task's outcome and the descriptors
/// and argument memfds open before the pool and after it.
fn kill_mid_task(_: ()) -> (Vec<Result<u64, String>>, Counts, Counts) {
    let before = (open_fds(), task_memfds().len());
    let outcomes = {
        let pool = Pool::new(2).unwrap();
        let items = (0..6u8).map(|i| (vec![i; 64 << 20], i == 2));
        let outcomes = pool
            .imap(sum_or_die, items)
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        pool.close();
        pool.join().unwrap();
        outcomes
    };
    let after = (open_fds(), task_memfds().len());
    (outcomes, before, after)
}

#[test]
fn a_worker_killed_with_a_64_mib_argument_in_flight_fails_that_task_alone_and_leaks_nothing() {
    let mut p = start(StartMethod::Spawn, kill_mid_task, ());
    let (outcomes, before, after) = p.join_timeout(TIMEOUT).unwrap();
    for (i, r) in outcomes.iter().enumerate() {
        if i == 2 {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("SIGKILL"), "task 2: {e}");
        } else {
            assert_eq!(r, &Ok(i as u64 * (64 << 20)), "task {i}");
        }
    }
    assert_eq!(before.1, 0);
    assert_eq!(
        after, before,
        "(descriptors, argument memfds) before and after"
    );
}

/// The length and ends of a vector (cheap even unoptimised, unlike a sum of 5 GiB).
fn ends(v: Vec<f32>) -> (usize, f32, f32) {
    (v.len(), v[0], v[v.len() - 1])
}

/// The most resident memory this process has had, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// In a fresh child: maps over 5 GiB of 4 MiB `Vec<f32>` items, made as they are taken;
/// returns whether every result was right and the peak resident memory.
fn five_gib_map(_: ()) -> (bool, u64) {
    let pool = Pool::new(2).unwrap();
    let n = 1280u32; // x 4 MiB = 5 GiB
    let items = (0..n).map(|i| {
        let mut v = vec![0f32; 1 << 20];
        v[0] = i as f32;
        v[(1 << 20) - 1] = -(i as f32);
        v
    });
    let got = pool.map(ends, items).unwrap();
    let right = got.len() == n as usize
        && got
            .iter()
            .enumerate()
            .all(|(i, &e)| e == (1 << 20, i as f32, -(i as f32)));
    pool.close();
    pool.join().unwrap();
    (right, peak_rss())
}

#[test]
fn a_5_gib_map_streams_through_bounded_memory() {
    let mut p = start(StartMethod::Spawn, five_gib_map, ());
    let (right, peak) = p.join_timeout(TIMEOUT).unwrap();
    assert!(right, "every sum");
    // The arguments in flight are bounded (32 MiB, plus the memfds kept for reuse), not
    // the input: 5 GiB went through.
    assert!(peak < 256 << 20, "peak resident memory {} MiB", peak >> 20);
}

/// A 64 KiB string that says which task made it.
fn text_of(i: u32) -> String {
    let mut s = format!("task {i}: ");
    s.extend(std::iter::repeat_n(
        char::from(b'a' + (i % 26) as u8),
        64 << 10,
    ));
    s
}

/// The memfds of task arguments and results this process has mapped, by inode.
fn mapped_task_memfds() -> BTreeSet<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| l.contains("gpuproc-task-args"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

/// In a fresh child: 20 maps whose runs of results (64 x 64 KiB) come back in the workers'
/// memfds; returns whether every result was right, and how many memfds were ever mapped.
fn results_in_memfds(_: ()) -> (bool, usize) {
    let pool = Pool::new(2).unwrap();
    let mut right = true;
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let got = pool.map(text_of, 0..64u32).unwrap();
        right &= got.iter().enumerate().all(|(i, s)| *s == text_of(i as u32));
        seen.extend(mapped_task_memfds());
    }
    pool.close();
    pool.join().unwrap();
    (right, seen.len())
}

#[test]
fn results_in_shared_memory_are_read_in_place_and_their_memfds_go_back_to_the_workers() {
    let mut p = start(StartMethod::Spawn, results_in_memfds, ());
    let (right, memfds) = p.join_timeout(TIMEOUT).unwrap();
    assert!(right, "every result");
    // Each worker reuses its memfds once the results in them are decoded: no more than the
    // two workers keep for reuse (8 each), not new ones for every run (20 maps of 4 chunks
    // per worker: 160 were mapped when memfds were never handed back).
    assert!(
        (1..=16).contains(&memfds),
        "{memfds} result memfds mapped over 20 maps"
    );
}

/// A plain struct (no padding), for `gpuproc::pod`.
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Point {
    x: f32,
    y: f32,
    id: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Cloud {
    name: String,
    #[serde(with = "gpuproc::pod")]
    points: Vec<Point>,
}

/// The cloud mirrored and renamed: a result as large as the argument.
fn mirror(mut c: Cloud) -> Cloud {
    c.points.iter_mut().for_each(|p| p.x = -p.x);
    c.name.push_str(" mirrored");
    c
}

#[test]
fn vectors_of_plain_structs_marked_pod_go_through_a_pool_and_back() {
    // Empty, small, and past the point where a chunk moves to shared memory, in one map.
    let clouds: Vec<Cloud> = [0usize, 3, 100_000, 1, 50_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| Cloud {
            name: format!("cloud {i}"),
            points: (0..n as u32)
                .map(|k| Point {
                    x: k as f32,
                    y: i as f32,
                    id: k,
                })
                .collect(),
        })
        .collect();
    let pool = Pool::new(2).unwrap();
    let got = pool.map(mirror, clouds.clone()).unwrap();
    assert_eq!(got, clouds.into_iter().map(mirror).collect::<Vec<_>>());
    pool.close();
    pool.join().unwrap();
}

/// A 64 KiB string for task `i`, except that task 40 kills its own worker.
fn text_or_die(i: u32) -> String {
    if i == 40 {
        // SAFETY: a plain system call on this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    text_of(i)
}

/// In a child process: a pool whose worker dies while runs of its results, in its memfds,
/// are still waiting to be read; returns each task's outcome (right or not) and the
/// descriptors and task memfds open before the pool and after it.
fn kill_with_results_lent(_: ()) -> (Vec<Result<bool, String>>, Counts, Counts) {
    let before = (open_fds(), task_memfds().len());
    let outcomes = {
        let pool = Pool::new(2).unwrap();
        let pids = pool.worker_pids();
        let mut it = pool.imap(text_or_die, 0..64u32);
        let first = it.next().map(|r| r.map(|s| s == text_of(0)));
        // Read nothing more until the worker is dead and replaced: the runs it sent before
        // are still waiting here, in its memfds.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while pool.worker_pids() == pids {
            assert!(std::time::Instant::now() < deadline, "no worker died");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let rest: Vec<_> = it
            .enumerate()
            .map(|(k, r)| r.map(|s| s == text_of(k as u32 + 1)))
            .collect();
        pool.close();
        pool.join().unwrap();
        first
            .into_iter()
            .chain(rest)
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    };
    let after = (open_fds(), task_memfds().len());
    (outcomes, before, after)
}

#[test]
fn a_worker_killed_while_its_results_are_being_read_costs_one_task_and_leaks_nothing() {
    let mut p = start(StartMethod::Spawn, kill_with_results_lent, ());
    let (outcomes, before, after) = p.join_timeout(TIMEOUT).unwrap();
    assert_eq!(outcomes.len(), 64);
    for (i, r) in outcomes.iter().enumerate() {
        if i == 40 {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("SIGKILL"), "task 40: {e}");
        } else {
            assert_eq!(r, &Ok(true), "task {i}");
        }
    }
    assert_eq!(after, before, "(descriptors, task memfds) before and after");
}
