//! The examples print what the Python article and docs print.

use crate::support::{run_example, stdout_lines};

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
