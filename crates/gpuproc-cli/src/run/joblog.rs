//! The job log (GNU parallel's `--joblog` TSV) and `--resume`.
//!
//! Columns, as GNU parallel writes them: `Seq Host Starttime JobRuntime Send Receive
//! Exitval Signal Command`; `Host` is `:` (this machine; in a Slurm run, `NODE/GPUS`: the
//! node and the job's GPUs), `Send`/`Receive` are 0. One line per attempt, written when the
//! attempt ends, so a log cut short by a killed runner is still valid up to its last
//! complete line.

use std::collections::HashMap;

use anyhow::bail;

/// The header line.
pub const HEADER: &str =
    "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand";

/// One attempt's line.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The job's sequence number.
    pub seq: usize,
    /// `Host`: `None` for this machine (`:`, as GNU parallel); in a Slurm run, the node
    /// and the GPUs Slurm gave the job, `NODE/GPUS` (`node7/0,1`: NVML indices on the
    /// node, or `CUDA_VISIBLE_DEVICES` where NVML could not say).
    pub host: Option<String>,
    /// Start, seconds since the Unix epoch.
    pub start: f64,
    /// Run time in seconds.
    pub runtime: f64,
    /// Exit status; -1 when killed by a signal.
    pub exit: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
    /// The command as run.
    pub command: String,
}

impl Entry {
    /// The line, without a newline. Tabs and newlines in the command become spaces so that
    /// the line stays one TSV record.
    pub fn to_line(&self) -> String {
        let command: String = self
            .command
            .chars()
            .map(|c| if c == '\t' || c == '\n' { ' ' } else { c })
            .collect();
        let host: String = match &self.host {
            Some(h) if !h.is_empty() => h
                .chars()
                .map(|c| if c.is_whitespace() { '_' } else { c })
                .collect(),
            _ => ":".to_owned(),
        };
        format!(
            "{}\t{host}\t{:.3}\t{:.3}\t0\t0\t{}\t{}\t{}",
            self.seq, self.start, self.runtime, self.exit, self.signal, command
        )
    }
}

/// Reads a job log and returns, for each job that succeeded (exit 0, no signal), its
/// sequence number and command. Failed attempts and an incomplete last line are ignored.
///
/// # Errors
/// A line that is not a job-log record (names the file and line).
pub fn succeeded(text: &str, source: &str) -> anyhow::Result<HashMap<usize, String>> {
    let mut done = HashMap::new();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    for (i, line) in complete.lines().enumerate() {
        if line.is_empty() || (i == 0 && line.starts_with("Seq\t")) {
            continue;
        }
        let fields: Vec<&str> = line.splitn(9, '\t').collect();
        let parsed = (fields.len() == 9)
            .then(|| {
                Some((
                    fields[0].parse::<usize>().ok()?,
                    fields[6].parse::<i32>().ok()?,
                    fields[7].parse::<i32>().ok()?,
                ))
            })
            .flatten();
        let Some((seq, exit, signal)) = parsed else {
            bail!(
                "{source}: line {}: not a job-log line; expected 9 tab-separated fields \
                 (Seq Host Starttime JobRuntime Send Receive Exitval Signal Command)",
                i + 1
            );
        };
        if exit == 0 && signal == 0 {
            done.insert(seq, fields[8].to_owned());
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_resume() {
        let ok = Entry {
            seq: 1,
            host: None,
            start: 1700000000.5,
            runtime: 0.25,
            exit: 0,
            signal: 0,
            command: "echo\ta".into(),
        };
        let failed = Entry {
            seq: 2,
            exit: 3,
            command: "false".into(),
            ..ok.clone()
        };
        let killed = Entry {
            seq: 3,
            exit: -1,
            signal: 9,
            command: "sleep 9".into(),
            ..ok.clone()
        };
        let line = ok.to_line();
        assert_eq!(line, "1\t:\t1700000000.500\t0.250\t0\t0\t0\t0\techo a");
        let on_node = Entry {
            host: Some("node 7/2,3".into()),
            ..ok.clone()
        };
        assert_eq!(
            on_node.to_line(),
            "1\tnode_7/2,3\t1700000000.500\t0.250\t0\t0\t0\t0\techo a"
        );
        let text = format!(
            "{HEADER}\n{line}\n{}\n{}\n4\t:\t1.0\t0.1\t0\t0\t0",
            failed.to_line(),
            killed.to_line()
        );
        let done = succeeded(&text, "log").unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[&1], "echo a");
    }

    #[test]
    fn garbage_names_the_line() {
        let err = succeeded(&format!("{HEADER}\nnonsense\n"), "log.tsv").unwrap_err();
        assert!(err.to_string().starts_with("log.tsv: line 2:"), "{err}");
    }
}
