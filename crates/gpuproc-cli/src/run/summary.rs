//! The table printed when a run ends: job, exit, time, retries, node (Slurm runs), GPUs and
//! peak GPU memory.

use std::fmt::Write;

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
    if gpu_mode {
        header.extend(["gpus", "peak mem"]);
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
            row.push(
                o.peak_memory
                    .map_or("-".to_owned(), |b| format!("{} MiB", b.div_ceil(1 << 20))),
            );
        }
        row.push(truncate(&o.command, 60));
        table.push(row);
    }
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
                } else if c == 0 || c == 2 || c == 3 {
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
}
