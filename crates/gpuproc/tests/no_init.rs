//! A program that never calls `gpuproc::init()`: the start methods that re-run the executable
//! are refused with an error saying what to add (re-running a program that does not expect it
//! would start it again from the top), and `Fork` still works.
//!
//! This test target has no libtest harness, so nothing calls `init` behind its back.

use std::process::{Command, Stdio};

use gpuproc::{Process, ProcessError, StartMethod};

/// Set when this executable runs as the README's first example without its `init()`.
const README_MAIN: &str = "GPUPROC_TEST_README_MAIN";

fn square(x: u64) -> u64 {
    x * x
}

/// The README's first example with the `init()` line forgotten: `main` returns the error, and
/// the standard library prints it with `Debug`.
fn readme_main() -> Result<(), gpuproc::PoolError> {
    let pool = gpuproc::Pool::new(2)?;
    println!("{:?}", pool.map(square, 0..10u64)?);
    Ok(())
}

/// What a user sees when `main` returns the error: the message saying what to add, not a
/// dump of variant names.
fn forgotten_init_reads_as_a_sentence() {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .env(README_MAIN, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the README example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "Error: cannot start a pool worker: the forkserver start method re-runs this \
             executable, which must call gpuproc::init() at the top of main"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("NotInitialized"), "{stderr}");
}

fn main() -> Result<(), gpuproc::PoolError> {
    if std::env::var_os(README_MAIN).is_some() {
        return readme_main();
    }
    forgotten_init_reads_as_a_sentence();
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
    println!("no_init: 4 passed, 0 failed");
    Ok(())
}
