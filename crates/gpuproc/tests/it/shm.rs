//! `gpuproc::shm` across processes: values and arrays with every start method, named
//! shared memory blocks; and the `shared_state` and `shared_memory` examples.

use gpuproc::shm::{SharedArray, SharedMemory, SharedValue};
use gpuproc::StartMethod;

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
