//! A program that never calls `gpuproc::init()`: the start methods that re-run the executable
//! are refused with an error saying what to add (re-running a program that does not expect it
//! would start it again from the top), and `Fork` still works.
//!
//! This test target has no libtest harness, so nothing calls `init` behind its back.

use gpuproc::{Process, ProcessError, StartMethod};

fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let mut p = Process::new(square, 3).with_start_method(m);
        let err = p.start().unwrap_err();
        assert!(
            matches!(err, ProcessError::NotInitialized { .. }),
            "{m:?}: {err}"
        );
        assert!(err.to_string().contains("gpuproc::init()"), "{err}");
    }
    let mut p = Process::new(square, 3).with_start_method(StartMethod::Fork);
    p.start().unwrap();
    assert_eq!(
        p.join_timeout(std::time::Duration::from_secs(60)).unwrap(),
        9
    );
    println!("no_init: 3 passed, 0 failed");
}
