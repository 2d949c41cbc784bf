//! A program that starts a thread before `gpuproc::init()`, as `#[tokio::main]` does: its
//! fork server would be multi-threaded, so it refuses to fork, and the error names the fix.
//! Spawn still works.
//!
//! This test target has no libtest harness, so nothing calls `init` before `main`.

use std::time::Duration;

use gpuproc::{Process, ProcessError, StartMethod};

fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    // A thread that lives as long as the program, started before init (in the fork server
    // too, which re-runs this main).
    let (_keep, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = wait.recv();
    });
    gpuproc::init();

    let mut p = Process::new(square, 3).with_start_method(StartMethod::ForkServer);
    let err = p.start().unwrap_err();
    assert!(matches!(err, ProcessError::ForkServer { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("init_before_main"), "{text}");
    assert!(text.contains("2 threads"), "{text}");

    let mut p = Process::new(square, 3).with_start_method(StartMethod::Spawn);
    p.start().unwrap();
    assert_eq!(p.join_timeout(Duration::from_secs(60)).unwrap(), 9);
    println!("threads_before_init: 2 passed, 0 failed");
}
