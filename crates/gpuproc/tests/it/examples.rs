//! The examples print what the Python article and docs print.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::support::{self, TIMEOUT};

/// Runs a built example (cargo builds examples before integration tests) with a timeout.
fn run_example(name: &str) -> Output {
    let exe = std::env::current_exe().unwrap();
    let dir: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built", path.display());
    let child = Command::new(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let reader = std::thread::spawn(move || child.wait_with_output().unwrap());
    let left = support::wait_all_ended(&[pid], Instant::now() + TIMEOUT);
    if !left.is_empty() {
        // SAFETY: a plain system call on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("example {name} did not finish within {TIMEOUT:?}");
    }
    let out = reader.join().unwrap();
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn cube_square_prints_the_articles_lines() {
    let out = run_example("cube_square");
    assert_eq!(stdout_lines(&out), ["Square: 100", "Cube: 1000", "Done!"]);
}

#[test]
fn process_ids_agree_inside_and_outside() {
    let lines = stdout_lines(&run_example("process_ids"));
    assert_eq!(lines.len(), 8, "{lines:?}");
    let value = |prefix: &str| -> String {
        let line = lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {lines:?}"));
        line[prefix.len()..].trim().to_string()
    };
    let main: u32 = value("ID of main process:").parse().unwrap();
    let w1: u32 = value("ID of process running worker1:").parse().unwrap();
    let w2: u32 = value("ID of process running worker2:").parse().unwrap();
    assert_eq!(value("ID of process p1:").parse::<u32>().unwrap(), w1);
    assert_eq!(value("ID of process p2:").parse::<u32>().unwrap(), w2);
    assert!(main != w1 && main != w2 && w1 != w2);
    assert_eq!(lines[0], format!("ID of main process: {main}"));
    assert_eq!(
        lines[5..],
        [
            "Both processes finished execution!",
            "Process p1 is alive: false",
            "Process p2 is alive: false"
        ]
    );
}

#[test]
fn process_class_examples() {
    let lines = stdout_lines(&run_example("process_class"));
    assert_eq!(lines[0], "hello bob");
    assert_eq!(lines[1], "main line");
    let main_pid = lines[4].strip_prefix("process id: ").unwrap().to_string();
    assert_eq!(lines[5], "function f");
    assert_eq!(lines[7], format!("parent process: {main_pid}"));
    assert_eq!(lines[9], "hello bob");
}
