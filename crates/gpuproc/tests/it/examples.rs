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

#[test]
fn the_main_demo_gives_each_worker_its_own_gpu() {
    let lines = stdout_lines(&run_example("demo"));
    let table: Vec<&String> = lines
        .iter()
        .skip_while(|l| !(l.starts_with("task") && l.contains("uuid")))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(table.len(), 4, "{lines:#?}");
    let mut gpus = Vec::new();
    for row in table {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let task: u64 = cols[0].parse().unwrap();
        let n = cols.len();
        let (mine, task_peak) = (cols[n - 3], cols[n - 2]);
        assert_eq!(mine, ((task + 1) * 1024).to_string(), "{row}");
        // A peak is sampled: it is the allocation, or 0 if no sample fell in the task.
        assert!(task_peak == mine || task_peak == "0", "{row}");
        let uuid = cols
            .iter()
            .find(|c| c.starts_with("GPU-"))
            .unwrap_or_else(|| panic!("{row}"));
        gpus.push(uuid.to_string());
    }
    gpus.sort();
    gpus.dedup();
    assert_eq!(gpus.len(), 4, "one GPU per worker");
}

#[test]
fn big_data_sums_rows_of_a_named_block_and_a_sealed_slice_in_the_workers() {
    assert_eq!(
        stdout_lines(&run_example("big_data")),
        [
            "64 rows of 16384 f32 (4 MiB), 2 workers",
            "named block: row 0 sums to 8192, row 63 to 1040384, all 64 rows 33554432",
            "sealed slice: row 0 sums to 8192, row 63 to 1040384, all 64 rows 33554432",
            "both agree with the parent: true",
        ]
    );
}
