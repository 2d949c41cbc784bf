//! A program whose `main` starts threads before its first line (as `#[tokio::main]` does)
//! and uses `gpuproc::init_before_main!()`: init runs from a constructor, before any thread,
//! so the fork server is single-threaded and forks.
//!
//! This test target has no libtest harness: only the constructor calls `init`.

use std::time::Duration;

use gpuproc::{Process, StartMethod};

gpuproc::init_before_main!();

fn square(x: u64) -> u64 {
    x * x
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn main() {
    let (_keep, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = wait.recv();
    });
    gpuproc::init(); // harmless a second time

    let mut p = Process::new(square, 3).with_start_method(StartMethod::ForkServer);
    p.start().unwrap();
    assert_eq!(p.join_timeout(Duration::from_secs(60)).unwrap(), 9);
    fn server(_: ()) -> u32 {
        std::os::unix::process::parent_id()
    }
    let mut p = Process::new(server, ()).with_start_method(StartMethod::ForkServer);
    p.start().unwrap();
    let server = p.join_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(threads_of(server), 1, "the fork server has other threads");
    println!("init_before_main: 2 passed, 0 failed");
}
