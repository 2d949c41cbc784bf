//! `gpuproc::shm` across processes: values and arrays with every start method, named
//! shared memory blocks; and the `shared_state` and `shared_memory` examples.

use gpuproc::shm::{SharedArray, SharedMemory, SharedValue};
use gpuproc::{Pool, Queue, SharedSlice, StartMethod};

use crate::support::start;
use crate::support::{self, TIMEOUT};

fn negate(a: SharedArray<i32>) -> usize {
    for i in 0..a.len() {
        a.set(i, -a.get(i).unwrap());
    }
    a.len()
}

#[test]
fn shared_array_reaches_a_child_with_every_start_method() {
    for m in StartMethod::all() {
        let arr = SharedArray::from_slice(&(0..10).collect::<Vec<i32>>()).unwrap();
        let mut p = start(m, negate, arr.clone());
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 10, "{m:?}");
        assert_eq!(
            arr.to_vec(),
            [0, -1, -2, -3, -4, -5, -6, -7, -8, -9],
            "{m:?}"
        );
    }
}

#[test]
fn shared_value_update_under_its_lock_loses_nothing() {
    fn add(v: SharedValue<i64>) {
        for _ in 0..500 {
            v.update(|x| x + 1).unwrap();
        }
    }
    for m in StartMethod::all() {
        let v = SharedValue::new(0i64).unwrap();
        let mut ps: Vec<_> = (0..3).map(|_| start(m, add, v.clone())).collect();
        for p in &mut ps {
            p.join_timeout(TIMEOUT).unwrap();
        }
        assert_eq!(v.get(), 1500, "{m:?}");
    }
}

#[test]
fn shared_memory_attached_by_name_in_a_child() {
    fn write_by_name(name: String) -> Result<usize, String> {
        let shm = SharedMemory::attach(&name).map_err(|e| e.to_string())?;
        shm.write_at(0, b"from the child");
        Ok(shm.size())
    }
    fn write_by_handle(shm: SharedMemory) -> bool {
        shm.write_at(0, b"handle");
        shm.unlink_on_drop()
    }
    for m in StartMethod::all() {
        let shm = SharedMemory::create(4096).unwrap();
        let mut p = start(m, write_by_name, shm.name().to_string());
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), Ok(4096), "{m:?}");
        let mut buf = [0u8; 14];
        shm.read_at(0, &mut buf);
        assert_eq!(&buf, b"from the child");

        // The handle itself can be passed; the child's copy does not own the name.
        let mut p = start(m, write_by_handle, shm);
        assert!(!p.join_timeout(TIMEOUT).unwrap(), "{m:?}");
    }
}

#[test]
fn attaching_a_name_that_does_not_exist_is_not_found() {
    let name = format!("gpuproc-test-missing-{}", std::process::id());
    let e = SharedMemory::attach(&name).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains(&name), "{e}");
    let e = SharedMemory::attach("no/slashes").unwrap_err();
    assert!(e.is_invalid_name(), "{e}");
}

#[test]
fn attaching_with_a_larger_size_is_wrong_size() {
    let shm = SharedMemory::create(100).unwrap();
    let e = SharedMemory::attach_with_size(shm.name(), 101).unwrap_err();
    assert!(e.is_wrong_size(), "{e}");
    assert!(e.to_string().contains("100 bytes"), "{e}");
    let ok = SharedMemory::attach_with_size(&format!("/{}", shm.name()), 100).unwrap();
    assert_eq!(ok.size(), 100);
    let e = SharedMemory::create_named(shm.name(), 10).unwrap_err();
    assert!(e.is_already_exists(), "{e}");
}

#[test]
fn a_block_is_unlinked_exactly_once() {
    let shm = SharedMemory::create(64).unwrap();
    let name = shm.name().to_string();
    let attached = SharedMemory::attach(&name).unwrap();
    shm.unlink().unwrap();
    assert!(SharedMemory::attach(&name).unwrap_err().is_not_found());
    assert!(shm.unlink().unwrap_err().is_already_unlinked());
    assert!(attached.unlink().unwrap_err().is_not_found());
    // The memory outlives the name while mapped.
    attached.write_at(0, b"x");
    let mut b = [0u8; 1];
    shm.read_at(0, &mut b);
    assert_eq!(&b, b"x");

    // A child unlinks it; the creator's drop then leaves the name alone (it is gone).
    fn unlink_it(name: String) -> bool {
        SharedMemory::attach(&name).unwrap().unlink().is_ok()
    }
    let shm = SharedMemory::create(64).unwrap();
    let name = shm.name().to_string();
    let mut p = start(StartMethod::ForkServer, unlink_it, name.clone());
    assert!(p.join_timeout(TIMEOUT).unwrap());
    assert!(shm.unlink().unwrap_err().is_not_found());
    drop(shm);

    // Dropping the creator unlinks; dropping an attached handle does not.
    let shm = SharedMemory::create(64).unwrap();
    let name = shm.name().to_string();
    drop(SharedMemory::attach(&name).unwrap());
    assert!(SharedMemory::attach(&name).is_ok());
    drop(shm);
    assert!(SharedMemory::attach(&name).unwrap_err().is_not_found());

    // A block created later under the same name is not removed by an old handle.
    let mut first = SharedMemory::create(8).unwrap();
    let name = first.name().to_string();
    first.set_unlink_on_drop(false);
    SharedMemory::attach(&name).unwrap().unlink().unwrap();
    let second = SharedMemory::create_named(&name, 8).unwrap();
    assert!(first.unlink().unwrap_err().is_not_found());
    assert!(SharedMemory::attach(&name).is_ok());
    drop(second);
}

#[test]
fn shared_state_example_prints_pythons_lines() {
    assert_eq!(
        support::stdout_lines(&support::run_example("shared_state")),
        ["3.1415927", "[0, -1, -2, -3, -4, -5, -6, -7, -8, -9]"]
    );
}

#[test]
fn shared_memory_example_prints_pythons_lines() {
    assert_eq!(
        support::stdout_lines(&support::run_example("shared_memory")),
        ["[22, 33, 44, 55, 100]", "howdy"]
    );
}

/// Sums the slice and sends back a new one: every element doubled.
fn sum_and_double(x: SharedSlice<f32>) -> (f32, SharedSlice<f32>) {
    let doubled = SharedSlice::build(x.len(), |out| {
        for (o, v) in out.iter_mut().zip(x.iter()) {
            *o = v * 2.0;
        }
    })
    .unwrap();
    (x.iter().sum(), doubled)
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn shared_slice_goes_to_a_child_and_back_with_every_start_method() {
    for m in StartMethod::all() {
        // 1 MiB, and the empty slice.
        for n in [1 << 18, 0] {
            let x = SharedSlice::from_vec(ramp(n)).unwrap();
            let mut p = start(m, sum_and_double, x.clone());
            let (sum, doubled) = p.join_timeout(TIMEOUT).unwrap();
            assert_eq!(sum, ramp(n).iter().sum::<f32>(), "{m:?}");
            assert_eq!(doubled.len(), n, "{m:?}");
            assert!(
                doubled.iter().zip(x.iter()).all(|(d, v)| *d == v * 2.0),
                "{m:?}"
            );
        }
    }
}

#[test]
fn shared_slice_as_pool_argument_and_result_with_every_start_method() {
    for m in StartMethod::all() {
        let pool = Pool::builder()
            .processes(2)
            .start_method(m)
            .allow_fork_with_threads(true)
            .build()
            .unwrap();
        let inputs: Vec<SharedSlice<f32>> = (0..8)
            .map(|i| SharedSlice::from_vec(vec![i as f32; 100_000]).unwrap())
            .collect();
        let got = pool.map(sum_and_double, inputs.clone()).unwrap();
        for (i, (sum, doubled)) in got.iter().enumerate() {
            assert_eq!(*sum, i as f32 * 100_000.0, "{m:?}");
            assert_eq!(doubled.len(), 100_000);
            assert!(doubled.iter().all(|&d| d == i as f32 * 2.0), "{m:?}");
        }
        pool.close();
        pool.join().unwrap();
    }
}

fn send_slices(q: Queue<(u32, SharedSlice<u64>)>) {
    for i in 0..3u32 {
        let s = SharedSlice::build(1000, |buf| buf.fill(u64::from(i))).unwrap();
        q.put((i, s)).unwrap();
    }
}

#[test]
fn shared_slice_through_a_queue_with_every_start_method() {
    for m in StartMethod::all() {
        let q = Queue::new().unwrap();
        let mut p = start(m, send_slices, q.clone());
        for i in 0..3u32 {
            let (j, s) = q.get_timeout(TIMEOUT).unwrap();
            assert_eq!(j, i, "{m:?}");
            assert_eq!(&s[..], &[u64::from(i); 1000][..], "{m:?}");
        }
        p.join_timeout(TIMEOUT).unwrap();
        // And the other way, to a child reading what the parent made.
        fn total(q: Queue<SharedSlice<u64>>) -> u64 {
            q.get_timeout(TIMEOUT).unwrap().iter().sum()
        }
        let q = Queue::new().unwrap();
        q.put(SharedSlice::from_slice(&[1u64, 2, 3]).unwrap())
            .unwrap();
        let mut p = start(m, total, q.clone());
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 6, "{m:?}");
    }
}

/// Receives a `SharedSlice<u32>` from the pipe: its sum, or why it was refused.
fn recv_u32s(conn: gpuproc::Connection) -> Result<u32, String> {
    let x: SharedSlice<u32> = conn.recv_timeout(TIMEOUT).map_err(|e| e.to_string())?;
    Ok(x.iter().sum())
}

#[test]
fn shared_slice_through_a_pipe_and_of_another_type_refused_with_the_reason() {
    for m in StartMethod::all() {
        let (a, b) = gpuproc::Pipe::new().unwrap();
        let mut p = start(m, recv_u32s, b);
        a.send(&SharedSlice::from_slice(&[1u32, 2, 3]).unwrap())
            .unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), Ok(6), "{m:?}");

        let (a, b) = gpuproc::Pipe::new().unwrap();
        let mut p = start(m, recv_u32s, b);
        a.send(&SharedSlice::from_slice(&[1.0f32]).unwrap())
            .unwrap();
        let e = p.join_timeout(TIMEOUT).unwrap().unwrap_err();
        assert!(e.contains("its elements are f32, not u32"), "{m:?}: {e}");
    }
}

/// Mappings of shared slices in this process.
fn slice_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:gpuproc-slice-"))
        .count()
}

#[test]
fn shared_slices_sent_and_dropped_leave_no_descriptor_or_mapping() {
    let q: Queue<SharedSlice<u64>> = Queue::new().unwrap();
    let round = || {
        let made: Vec<SharedSlice<u64>> = (0..50u64)
            .map(|i| SharedSlice::build(20_000, |b| b.fill(i)).unwrap())
            .collect();
        assert!(slice_mappings() >= 50);
        for s in &made {
            q.put(s.clone()).unwrap();
        }
        for i in 0..50u64 {
            let s = q.get_timeout(TIMEOUT).unwrap();
            assert_eq!(s[19_999], i);
        }
    };
    round(); // the queue's own buffers, made once
    let (fds, maps) = (support::open_fds(), slice_mappings());
    round();
    assert_eq!(support::open_fds(), fds, "descriptors leaked");
    assert_eq!(slice_mappings(), maps, "mappings leaked");
    assert_eq!(maps, 0);
}
