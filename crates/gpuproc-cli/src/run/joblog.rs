//! The job log (GNU parallel's `--joblog` TSV) and `--resume`.
//!
//! Columns, as GNU parallel writes them: `Seq Host Starttime JobRuntime Send Receive
//! Exitval Signal Command`; `Host` is `:` (this machine; in a Slurm run, `NODE/GPUS`: the
//! node and the job's GPUs), `Send`/`Receive` are 0. Then, after GNU parallel's columns,
//! the attempt's GPU accounting ([`GPU_HEADER`]; empty where unknown, as in a CPU-only
//! run): `GpuStart GpuEnd` (the first and last sample with the job on a GPU, seconds since
//! the Unix epoch), `GpuPeakMem GpuMeanMem` (bytes), `GpuMeanSM` (percent of one GPU) and
//! `GpuEnergy` (joules; only when the job had its GPUs alone, see
//! [`GpuAccounting::energy_mj`]). A job log that already has GNU parallel's header alone
//! (written by GNU parallel or an older gpuproc) gets lines of 9 columns, so that the file
//! stays one table; `--resume` reads both.
//!
//! One line per attempt, written when the attempt ends, so a log cut short by a killed
//! runner is still valid up to its last complete line.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{bail, Context};
use gpuproc::gpu::GpuAccounting;

/// GNU parallel's header line.
pub const HEADER: &str =
    "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand";

/// The columns gpuproc adds after GNU parallel's.
pub const GPU_HEADER: &str = "GpuStart\tGpuEnd\tGpuPeakMem\tGpuMeanMem\tGpuMeanSM\tGpuEnergy";

/// GNU parallel's columns.
const COLUMNS: usize = 9;
/// With gpuproc's.
const GPU_COLUMNS: usize = 15;

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
    /// The attempt's GPU accounting (`None`: not sampled, or an old line). Of its fields the
    /// line keeps the window, peak and mean memory, mean SM and energy.
    pub gpu: Option<GpuAccounting>,
}

/// `ms` as seconds with three decimals, exactly.
fn seconds_ms(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// Seconds with up to three decimals as milliseconds; `None` for anything else.
fn parse_seconds_ms(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 3
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac_ms: u64 = format!("{frac:0<3}").parse().ok()?;
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(frac_ms)
}

impl Entry {
    /// The line, without a newline; with `gpu_columns`, gpuproc's columns after GNU
    /// parallel's. Tabs and newlines in the command become spaces so that the line stays
    /// one TSV record.
    pub fn to_line(&self, gpu_columns: bool) -> String {
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
        let mut line = format!(
            "{}\t{host}\t{:.3}\t{:.3}\t0\t0\t{}\t{}\t{}",
            self.seq, self.start, self.runtime, self.exit, self.signal, command
        );
        if gpu_columns {
            let g = self.gpu.clone().unwrap_or_default();
            let cells = [
                g.first_ms.map(seconds_ms),
                g.last_ms.map(seconds_ms),
                g.peak_memory.map(|b| b.to_string()),
                g.mean_memory.map(|b| b.to_string()),
                g.mean_sm_percent.map(|p| format!("{p:.1}")),
                g.energy_mj.map(seconds_ms),
            ];
            for cell in cells {
                line.push('\t');
                line.push_str(cell.as_deref().unwrap_or(""));
            }
        }
        line
    }

    /// Parses a line of either width; `None` when it is not a job-log line. A line of 15
    /// fields whose last 6 read as gpuproc's columns has them; any other line of 9 or more
    /// fields is GNU parallel's, its command the rest of the line (tabs included).
    pub fn parse(line: &str) -> Option<Entry> {
        let fields: Vec<&str> = line.split('\t').collect();
        let gpu = (fields.len() == GPU_COLUMNS)
            .then(|| parse_gpu(&fields[COLUMNS..]))
            .flatten();
        let fields: Vec<&str> = match gpu {
            Some(_) => fields[..COLUMNS].to_vec(),
            None => line.splitn(COLUMNS, '\t').collect(),
        };
        if fields.len() != COLUMNS {
            return None;
        }
        let host = match fields[1] {
            ":" => None,
            h => Some(h.to_owned()),
        };
        // GNU parallel pads JobRuntime with spaces; neither time decides anything here.
        let seconds = |s: &str| s.trim().parse::<f64>().unwrap_or(0.0);
        Some(Entry {
            seq: fields[0].parse().ok()?,
            host,
            start: seconds(fields[2]),
            runtime: seconds(fields[3]),
            exit: fields[6].parse().ok()?,
            signal: fields[7].parse().ok()?,
            command: fields[8].to_owned(),
            gpu: gpu.flatten(),
        })
    }
}

/// gpuproc's 6 columns: `Some(None)` when all are empty, `None` when one is not what
/// gpuproc writes there.
fn parse_gpu(cells: &[&str]) -> Option<Option<GpuAccounting>> {
    let [first, last, peak, mean, sm, energy] = cells else {
        return None;
    };
    let opt = |s: &'_ str| (!s.is_empty()).then_some(s.to_owned());
    let ms = |s: &str| opt(s).map(|v| parse_seconds_ms(&v).ok_or(())).transpose();
    let int = |s: &str| opt(s).map(|v| v.parse::<u64>().map_err(|_| ())).transpose();
    let sm = opt(sm)
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .filter(|p| p.is_finite() && *p >= 0.0)
                .ok_or(())
        })
        .transpose();
    let g = GpuAccounting {
        first_ms: ms(first).ok()?,
        last_ms: ms(last).ok()?,
        peak_memory: int(peak).ok()?,
        mean_memory: int(mean).ok()?,
        mean_sm_percent: sm.ok()?,
        energy_mj: ms(energy).ok()?,
        ..GpuAccounting::default()
    };
    Some((g != GpuAccounting::default()).then_some(g))
}

/// An open job log.
#[derive(Debug)]
pub struct JobLog {
    file: File,
    /// Whether lines carry gpuproc's columns (not when the file has GNU parallel's header
    /// alone).
    gpu_columns: bool,
}

impl JobLog {
    /// Opens `path` for appending, writing the header into a new (or empty) file.
    ///
    /// # Errors
    /// When the file cannot be opened, read or written.
    pub fn open(path: &Path) -> anyhow::Result<JobLog> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening job log {}", path.display()))?;
        let mut first = String::new();
        BufReader::new(&file)
            .read_line(&mut first)
            .with_context(|| format!("reading job log {}", path.display()))?;
        let gpu_columns = first.trim_end_matches(['\n', '\r']) != HEADER;
        if first.is_empty() {
            writeln!(file, "{HEADER}\t{GPU_HEADER}")
                .with_context(|| format!("writing job log {}", path.display()))?;
        }
        Ok(JobLog { file, gpu_columns })
    }

    /// Appends `entry`'s line, in one write, so a killed runner leaves only whole lines.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&mut self, entry: &Entry) -> anyhow::Result<()> {
        let line = format!("{}\n", entry.to_line(self.gpu_columns));
        self.file
            .write_all(line.as_bytes())
            .context("writing the job log")
    }
}

/// Reads a job log and returns, for each job that succeeded (exit 0, no signal), its
/// sequence number and command. Failed attempts and an incomplete last line are ignored.
/// Lines with and without gpuproc's columns are read alike.
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
        let Some(entry) = Entry::parse(line) else {
            bail!(
                "{source}: line {}: not a job-log line; expected 9 tab-separated fields \
                 (Seq Host Starttime JobRuntime Send Receive Exitval Signal Command), or 15 \
                 with gpuproc's ({})",
                i + 1,
                GPU_HEADER.replace('\t', " ")
            );
        };
        if entry.exit == 0 && entry.signal == 0 {
            done.insert(entry.seq, entry.command);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Entry {
        Entry {
            seq: 1,
            host: None,
            start: 1700000000.5,
            runtime: 0.25,
            exit: 0,
            signal: 0,
            command: "echo\ta".into(),
            gpu: None,
        }
    }

    #[test]
    fn round_trip_and_resume() {
        let ok = ok();
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
        let line = ok.to_line(false);
        assert_eq!(line, "1\t:\t1700000000.500\t0.250\t0\t0\t0\t0\techo a");
        let on_node = Entry {
            host: Some("node 7/2,3".into()),
            ..ok.clone()
        };
        assert_eq!(
            on_node.to_line(false),
            "1\tnode_7/2,3\t1700000000.500\t0.250\t0\t0\t0\t0\techo a"
        );
        let text = format!(
            "{HEADER}\n{line}\n{}\n{}\n4\t:\t1.0\t0.1\t0\t0\t0",
            failed.to_line(false),
            killed.to_line(false)
        );
        let done = succeeded(&text, "log").unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[&1], "echo a");
    }

    #[test]
    fn gpu_columns_follow_gnu_parallels_and_parse_back() {
        let gpu = GpuAccounting {
            first_ms: Some(1_700_000_001_250),
            last_ms: Some(1_700_000_004_000),
            samples: 4,
            peak_memory: Some(2 << 30),
            mean_memory: Some(1_500_000_000),
            mean_sm_percent: Some(57.25),
            energy_mj: Some(1_234_567),
            shared: false,
        };
        let entry = Entry {
            gpu: Some(gpu.clone()),
            command: "train --lr 0.1".into(),
            ..ok()
        };
        let line = entry.to_line(true);
        assert_eq!(
            line,
            "1\t:\t1700000000.500\t0.250\t0\t0\t0\t0\ttrain --lr 0.1\t1700000001.250\t\
             1700000004.000\t2147483648\t1500000000\t57.2\t1234.567"
        );
        let back = Entry::parse(&line).unwrap();
        let got = back.gpu.clone().unwrap();
        assert_eq!(
            (
                got.first_ms,
                got.last_ms,
                got.peak_memory,
                got.mean_memory,
                got.energy_mj
            ),
            (
                gpu.first_ms,
                gpu.last_ms,
                gpu.peak_memory,
                gpu.mean_memory,
                gpu.energy_mj
            )
        );
        assert_eq!(got.mean_sm_percent, Some(57.2));
        assert_eq!((back.seq, back.command.as_str()), (1, "train --lr 0.1"));
        // Unknown figures are empty cells: a shared GPU has no energy.
        let shared = Entry {
            gpu: Some(GpuAccounting {
                energy_mj: None,
                shared: true,
                ..gpu
            }),
            ..ok()
        };
        let line = shared.to_line(true);
        assert!(line.ends_with("\t57.2\t"), "{line}");
        assert_eq!(Entry::parse(&line).unwrap().gpu.unwrap().energy_mj, None);
        // A CPU job's line: six empty cells.
        let cpu = ok().to_line(true);
        assert!(cpu.ends_with("echo a\t\t\t\t\t\t"), "{cpu:?}");
        assert_eq!(Entry::parse(&cpu).unwrap().gpu, None);
        assert_eq!(Entry::parse(&cpu).unwrap().command, "echo a");
    }

    #[test]
    fn resume_reads_old_new_and_gnu_parallel_logs() {
        let new = Entry {
            seq: 2,
            gpu: Some(GpuAccounting {
                peak_memory: Some(5),
                ..GpuAccounting::default()
            }),
            ..ok()
        };
        // GNU parallel pads the run time and keeps tabs in commands.
        let parallel = "3\t:\t1700000000.123\t     0.004\t0\t5\t0\t0\tprintf 'a\tb'";
        let text = format!(
            "{HEADER}\t{GPU_HEADER}\n{}\n{}\n{parallel}\n",
            ok().to_line(false),
            new.to_line(true)
        );
        let done = succeeded(&text, "log").unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(done[&2], "echo a");
        assert_eq!(done[&3], "printf 'a\tb'");
        // 15 fields that are not gpuproc's: a GNU parallel command with tabs.
        let tabs = "4\t:\t1.0\t0.1\t0\t0\t0\t0\ta\tb\tc\td\te\tf\tg";
        assert_eq!(Entry::parse(tabs).unwrap().command, "a\tb\tc\td\te\tf\tg");
        assert_eq!(Entry::parse(tabs).unwrap().gpu, None);
    }

    #[test]
    fn a_log_with_gnu_parallels_header_stays_nine_columns() {
        let dir = std::env::temp_dir().join(format!("gpuproc-joblog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old.tsv");
        std::fs::write(&old, format!("{HEADER}\n{}\n", ok().to_line(false))).unwrap();
        let mut log = JobLog::open(&old).unwrap();
        log.write(&Entry {
            seq: 2,
            gpu: Some(GpuAccounting::default()),
            ..ok()
        })
        .unwrap();
        let text = std::fs::read_to_string(&old).unwrap();
        assert!(text.lines().all(|l| l.split('\t').count() == 9), "{text}");
        let new = dir.join("new.tsv");
        let mut log = JobLog::open(&new).unwrap();
        log.write(&ok()).unwrap();
        drop(log);
        let mut log = JobLog::open(&new).unwrap();
        log.write(&ok()).unwrap();
        let text = std::fs::read_to_string(&new).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "one header: {text}");
        assert_eq!(lines[0], format!("{HEADER}\t{GPU_HEADER}"));
        assert!(lines.iter().all(|l| l.split('\t').count() == 15), "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn garbage_names_the_line() {
        let err = succeeded(&format!("{HEADER}\nnonsense\n"), "log.tsv").unwrap_err();
        assert!(err.to_string().starts_with("log.tsv: line 2:"), "{err}");
    }
}
