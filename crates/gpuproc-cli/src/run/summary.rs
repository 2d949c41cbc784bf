//! The table printed when a run ends: job, exit, time, retries, node (Slurm runs), GPUs,
//! and the jobs' GPU accounting (peak and mean memory, mean SM utilisation, energy); and
//! the same as JSON (`--json`).

use std::fmt::Write;

use gpuproc::gpu::GpuAccounting;

use super::exec::{Outcome, Report};
use super::sys::Exit;

/// Which rows the summary shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SummaryRows {
    /// Every job up to 50 jobs; beyond that, only jobs that did not succeed.
    Auto,
    /// Every job.
    All,
    /// Only jobs that did not succeed.
    Failed,
    /// No table, only the totals line.
    None,
}

const AUTO_LIMIT: usize = 50;

/// Renders the table and a totals line.
pub fn render(report: &Report, rows: SummaryRows, gpu_mode: bool) -> String {
    let outcomes = &report.outcomes;
    let all = match rows {
        SummaryRows::All => true,
        SummaryRows::Auto => outcomes.len() <= AUTO_LIMIT,
        SummaryRows::Failed | SummaryRows::None => false,
    };
    let shown: Vec<&Outcome> = if rows == SummaryRows::None {
        Vec::new()
    } else {
        outcomes.iter().filter(|o| all || !o.succeeded()).collect()
    };
    let mut header = vec!["job", "exit", "time", "retries"];
    let nodes = outcomes.iter().any(|o| o.node.is_some());
    if nodes {
        header.push("node");
    }
    // Accounting columns that no job has a figure for are left out (no per-process
    // utilisation under MIG, no energy on shared GPUs or before Volta).
    let any =
        |f: fn(&GpuAccounting) -> bool| outcomes.iter().any(|o| o.gpu.as_ref().is_some_and(f));
    let mean_mem = gpu_mode && any(|g| g.mean_memory.is_some());
    let sm = gpu_mode && any(|g| g.mean_sm_percent.is_some());
    let energy = gpu_mode && any(|g| g.energy_mj.is_some());
    if gpu_mode {
        header.extend(["gpus", "peak mem"]);
    }
    if mean_mem {
        header.push("mean");
    }
    if sm {
        header.push("SM%");
    }
    if energy {
        header.push("energy");
    }
    header.push("command");
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for o in &shown {
        let exit = match (o.skipped, o.exit, o.timed_out) {
            (true, _, _) => "done before".to_owned(),
            (_, None, _) => "not run".to_owned(),
            (_, Some(_), true) => "timeout".to_owned(),
            (_, Some(Exit::Code(c)), _) => c.to_string(),
            (_, Some(Exit::Signal(s)), _) => format!("signal {s}"),
        };
        let mut row = vec![
            o.seq.to_string(),
            exit,
            if o.exit.is_some() {
                format!("{:.2}s", o.runtime.as_secs_f64())
            } else {
                "-".to_owned()
            },
            o.attempts.saturating_sub(1).to_string(),
        ];
        if nodes {
            row.push(o.node.clone().unwrap_or_else(|| "-".to_owned()));
        }
        if gpu_mode {
            let gpus: Vec<String> = o.gpus.iter().map(u32::to_string).collect();
            row.push(if gpus.is_empty() {
                "-".to_owned()
            } else {
                gpus.join(",")
            });
            row.push(o.peak_memory.map_or("-".to_owned(), size));
        }
        let g = o.gpu.clone().unwrap_or_default();
        if mean_mem {
            row.push(g.mean_memory.map_or("-".to_owned(), size));
        }
        if sm {
            row.push(
                g.mean_sm_percent
                    .map_or("-".to_owned(), |p| format!("{p:.0}")),
            );
        }
        if energy {
            row.push(g.energy_mj.map_or("-".to_owned(), joules));
        }
        row.push(truncate(&o.command, 60));
        table.push(row);
    }
    let right = ["peak mem", "mean", "SM%", "energy"];
    let mut out = String::new();
    if table.len() > 1 {
        let columns = table[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                table
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &table {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == columns {
                    line.push_str(cell);
                } else if c == 0 || c == 2 || c == 3 || right.contains(&table[0][c].as_str()) {
                    let _ = write!(line, "{cell:>w$}  ", w = widths[c]);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    let succeeded = outcomes
        .iter()
        .filter(|o| !o.skipped && o.succeeded())
        .count();
    let skipped = outcomes.iter().filter(|o| o.skipped).count();
    let not_run = outcomes
        .iter()
        .filter(|o| !o.skipped && o.exit.is_none())
        .count();
    let failed = outcomes.len() - succeeded - skipped - not_run;
    let _ = write!(out, "{succeeded} succeeded, {failed} failed");
    if skipped > 0 {
        let _ = write!(out, ", {skipped} done before (--resume)");
    }
    if not_run > 0 {
        let _ = write!(out, ", {not_run} not run");
    }
    if report.interrupted {
        out.push_str(" (interrupted)");
    }
    out.push('\n');
    out
}

/// Bytes as MiB below 1 GiB, else GiB, with one decimal below 10: "3 MiB", "2.5 GiB",
/// "20 GiB".
fn size(bytes: u64) -> String {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if bytes < 1 << 30 {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    } else if gib < 9.95 {
        format!("{gib:.1} GiB")
    } else {
        format!("{gib:.0} GiB")
    }
}

/// Millijoules as J, kJ or MJ with three significant figures: "812 J", "12.3 kJ".
fn joules(mj: u64) -> String {
    let j = mj as f64 / 1000.0;
    let (value, unit) = if j < 1e3 {
        (j, "J")
    } else if j < 1e6 {
        (j / 1e3, "kJ")
    } else {
        (j / 1e6, "MJ")
    };
    if value < 9.995 {
        format!("{value:.2} {unit}")
    } else if value < 99.95 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// The run as JSON (`--json`): totals, then every job with its status, exit, attempts,
/// run time, node, GPUs, peak memory over all attempts, and the last attempt's GPU
/// accounting (`gpu`, as [`GpuAccounting`] serialises: `first_ms`, `last_ms`, `samples`,
/// `peak_memory`, `mean_memory`, `mean_sm_percent`, `energy_mj`, `shared`).
pub fn json(report: &Report) -> serde_json::Value {
    let count = |f: &dyn Fn(&Outcome) -> bool| report.outcomes.iter().filter(|o| f(o)).count();
    let jobs: Vec<serde_json::Value> = report
        .outcomes
        .iter()
        .map(|o| {
            let status = match (o.skipped, o.exit, o.timed_out) {
                (true, _, _) => "done_before",
                (_, None, _) => "not_run",
                (_, Some(_), true) => "timed_out",
                _ if o.succeeded() => "succeeded",
                _ => "failed",
            };
            let (exit, signal) = match o.exit {
                Some(Exit::Code(c)) => (Some(c), None),
                Some(Exit::Signal(s)) => (None, Some(s)),
                None => (None, None),
            };
            serde_json::json!({
                "seq": o.seq,
                "command": o.command,
                "status": status,
                "exit": exit,
                "signal": signal,
                "attempts": o.attempts,
                "runtime_s": o.exit.map(|_| o.runtime.as_secs_f64()),
                "node": o.node,
                "gpus": o.gpus,
                "peak_memory": o.peak_memory,
                "gpu": o.gpu,
            })
        })
        .collect();
    serde_json::json!({
        "succeeded": count(&|o| !o.skipped && o.succeeded()),
        "failed": count(&|o| !o.skipped && o.exit.is_some() && !o.succeeded()),
        "done_before": count(&|o| o.skipped),
        "not_run": count(&|o| !o.skipped && o.exit.is_none()),
        "interrupted": report.interrupted,
        "starved": report.starved,
        "jobs": jobs,
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(seq: usize, exit: Option<Exit>, attempts: u32) -> Outcome {
        Outcome {
            seq,
            command: format!("job {seq}"),
            attempts,
            exit,
            timed_out: false,
            runtime: Duration::from_millis(1500),
            peak_memory: Some(3 << 20),
            gpu: None,
            gpus: vec![1],
            node: None,
            skipped: false,
        }
    }

    #[test]
    fn table_and_totals() {
        let report = Report {
            outcomes: vec![
                outcome(1, Some(Exit::Code(0)), 1),
                outcome(2, Some(Exit::Code(3)), 3),
                outcome(3, Some(Exit::Signal(9)), 1),
                outcome(4, None, 0),
            ],
            interrupted: true,
            starved: None,
        };
        let text = render(&report, SummaryRows::Auto, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("job  exit"), "{text}");
        assert!(
            lines[2].contains("1.50s") && lines[2].contains("3 MiB"),
            "{text}"
        );
        assert!(lines[2].split_whitespace().nth(3) == Some("2"), "{text}");
        assert!(lines[3].contains("signal 9"), "{text}");
        assert!(lines[4].contains("not run"), "{text}");
        assert_eq!(lines[5], "1 succeeded, 2 failed, 1 not run (interrupted)");
        let failed_only = render(&report, SummaryRows::Failed, false);
        assert_eq!(failed_only.lines().count(), 5, "{failed_only}");
        assert!(!failed_only.contains("MiB"));
        assert_eq!(render(&report, SummaryRows::None, true).lines().count(), 1);
    }

    #[test]
    fn slurm_runs_have_a_node_column() {
        let mut on_node = outcome(1, Some(Exit::Code(0)), 1);
        on_node.node = Some("node7".into());
        let report = Report {
            outcomes: vec![on_node, outcome(2, Some(Exit::Code(1)), 1)],
            interrupted: false,
            starved: None,
        };
        let text = render(&report, SummaryRows::All, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["job", "exit", "time", "retries", "node", "gpus", "peak", "mem", "command"],
            "{text}"
        );
        assert_eq!(lines[1].split_whitespace().nth(4), Some("node7"), "{text}");
        assert_eq!(lines[2].split_whitespace().nth(4), Some("-"), "{text}");
    }

    #[test]
    fn accounting_columns_fit_80_and_appear_when_known() {
        let mut alone = outcome(1, Some(Exit::Code(0)), 1);
        alone.runtime = Duration::from_secs_f64(123.45);
        alone.peak_memory = Some(20 << 30);
        alone.gpu = Some(GpuAccounting {
            first_ms: Some(1_000),
            last_ms: Some(120_000),
            samples: 120,
            peak_memory: Some(20 << 30),
            mean_memory: Some(12 << 30),
            mean_sm_percent: Some(57.4),
            energy_mj: Some(12_345_678),
            shared: false,
        });
        let mut shared = outcome(2, Some(Exit::Code(0)), 1);
        shared.gpu = Some(GpuAccounting {
            mean_memory: Some(1 << 20),
            mean_sm_percent: Some(3.0),
            shared: true,
            ..GpuAccounting::default()
        });
        let report = Report {
            outcomes: vec![alone, shared],
            interrupted: false,
            starved: None,
        };
        let text = render(&report, SummaryRows::All, true);
        let lines: Vec<&str> = text.lines().collect();
        let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            words(lines[0]),
            [
                "job", "exit", "time", "retries", "gpus", "peak", "mem", "mean", "SM%", "energy",
                "command"
            ],
            "{text}"
        );
        assert_eq!(
            words(lines[1]),
            [
                "1", "0", "123.45s", "0", "1", "20", "GiB", "12", "GiB", "57", "12.3", "kJ", "job",
                "1"
            ],
            "{text}"
        );
        assert!(
            lines[2].contains("1 MiB") && lines[2].contains(" 3 "),
            "{text}"
        );
        assert!(
            lines[2].trim_end().ends_with("-  job 2"),
            "no energy when shared: {text}"
        );
        // Everything but the command fits in 80 columns, with room to start it.
        let command_at = lines[0].find("command").unwrap();
        assert!(command_at + 13 <= 80, "{text}");

        // Columns nobody has a figure for are left out; CPU runs have none.
        let plain = Report {
            outcomes: vec![outcome(1, Some(Exit::Code(0)), 1)],
            interrupted: false,
            starved: None,
        };
        let text = render(&plain, SummaryRows::All, true);
        assert!(
            !text.contains("SM%") && !text.contains("energy") && !text.contains("mean"),
            "{text}"
        );
        let text = render(&report, SummaryRows::All, false);
        assert!(!text.contains("SM%") && !text.contains("mem"), "{text}");
    }

    #[test]
    fn sizes_and_energy_read_at_a_glance() {
        assert_eq!(size(3 << 20), "3 MiB");
        assert_eq!(size(1), "1 MiB");
        assert_eq!(size(1 << 30), "1.0 GiB");
        assert_eq!(size(5 << 29), "2.5 GiB");
        assert_eq!(size(80 << 30), "80 GiB");
        assert_eq!(joules(812_000), "812 J");
        assert_eq!(joules(5_250), "5.25 J");
        assert_eq!(joules(12_345_678), "12.3 kJ");
        assert_eq!(joules(999_999_999), "1000 kJ");
        assert_eq!(joules(2_500_000_000), "2.50 MJ");
    }

    #[test]
    fn json_has_totals_and_each_jobs_accounting() {
        let mut timed_out = outcome(2, Some(Exit::Signal(15)), 2);
        timed_out.timed_out = true;
        let mut first = outcome(1, Some(Exit::Code(0)), 1);
        first.gpu = Some(GpuAccounting {
            energy_mj: Some(42),
            ..GpuAccounting::default()
        });
        let mut skipped = outcome(4, None, 0);
        skipped.skipped = true;
        let report = Report {
            outcomes: vec![first, timed_out, outcome(3, None, 0), skipped],
            interrupted: false,
            starved: Some("no GPUs".into()),
        };
        let v = json(&report);
        assert_eq!(
            (
                &v["succeeded"],
                &v["failed"],
                &v["not_run"],
                &v["done_before"]
            ),
            (&1.into(), &1.into(), &1.into(), &1.into())
        );
        assert_eq!(v["starved"], "no GPUs");
        let jobs = v["jobs"].as_array().unwrap();
        assert_eq!(jobs[0]["status"], "succeeded");
        assert_eq!(jobs[0]["gpu"]["energy_mj"], 42);
        assert_eq!(jobs[0]["gpu"]["mean_sm_percent"], serde_json::Value::Null);
        assert_eq!(jobs[0]["runtime_s"], 1.5);
        assert_eq!(jobs[1]["status"], "timed_out");
        assert_eq!(
            (&jobs[1]["exit"], &jobs[1]["signal"]),
            (&serde_json::Value::Null, &15.into())
        );
        assert_eq!(jobs[2]["status"], "not_run");
        assert_eq!(jobs[2]["gpu"], serde_json::Value::Null);
        assert_eq!(jobs[3]["status"], "done_before");
    }
}
