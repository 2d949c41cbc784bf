//! Command-line syntax: clap derive types, documented so that `--help` is the manual.

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status for any failure not listed separately.
pub const EXIT_ERROR: u8 = 1;
/// Exit status when there is no NVIDIA driver or NVML library.
pub const EXIT_NO_DRIVER: u8 = 2;
/// Exit status for a command line that does not parse.
pub const EXIT_USAGE: u8 = 64;

const EXIT_STATUS: &str = "Exit status:
  0   success
  1   error
  2   no NVIDIA driver or NVML library (nothing to show)
  3   pick: no GPU free; run: a job failed or could not start
  64  bad command line
  130 run: interrupted (Ctrl-C)

Environment:
  GPUPROC_NVML_LIB  path of the libnvidia-ml to load instead of libnvidia-ml.so.1";

/// GPU information and multi-process tools.
#[derive(Debug, Parser)]
#[command(name = "gpuproc", version, about, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List GPUs and the processes using them (like gpustat).
    #[command(after_help = EXIT_STATUS)]
    Gpus(GpusArgs),
    /// Pick free GPUs and lease them: print a CUDA_VISIBLE_DEVICES value, or run a command
    /// with it (--hold).
    Pick(crate::cmd::pick::PickArgs),
    /// Run a queue of shell commands spread over GPUs (like GNU parallel).
    Run(crate::run::RunArgs),
    /// Watch GPUs and their processes live (like nvitop): history graphs, sorting,
    /// filtering, a process tree, signals, and which gpuproc lease or run job holds what.
    #[command(after_help = TOP_KEYS)]
    Top(TopArgs),

    /// The wrapper each Slurm task of `gpuproc run --slurm` runs (internal).
    #[command(name = "__slurm-job", hide = true)]
    SlurmJob(crate::run::slurm::wrapper::SlurmJobArgs),
}

const TOP_KEYS: &str = "Keys:
  q, Esc       quit (Esc first clears a filter)
  /            filter: type words that must all appear in the user, command, pid or
               holder (gpu:N for one GPU); Enter keeps it, Esc clears it
  s, S         next, previous sort key (also > and <);  r  reverse the order
  g p u m M    sort by GPU, pid, user, %SM, GPU memory (again: reverse)
  c h e n      sort by %CPU, host memory, run time, command
  t            tree of process families (a launcher above its workers)
  Up Down j k  select a process;  PgUp PgDn Home End
  T K I        send SIGTERM, SIGKILL, SIGINT to the selected process (asks y/N)

Columns: GPU (index, /N for a MIG device), PID, USER, %SM (the process's share of the
GPU's streaming multiprocessors), GPU-MEM, %CPU (of one core), HOST-MEM (resident), TIME
(since it started), COMMAND, prefixed by what holds it: [run job], [pick --hold], [lease]
(a pool or a Process::with_gpus), with the holder's pid when it is an ancestor.

Layout: a panel per GPU (figures, memory and utilisation bars, history graphs of
utilisation and memory, MIG devices, the lease holding it) when the terminal is tall
enough, else two lines or one line per GPU; two columns of panels from 160 columns.
Works from 80x24.";

/// Options of `gpuproc top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Print one frame to standard output and exit (the terminal's size, else $COLUMNS x
    /// $LINES, else 80x24).
    #[arg(long, short = '1')]
    pub once: bool,

    /// Seconds between samples.
    #[arg(long, short = 'n', value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,

    /// Start in the tree view.
    #[arg(long)]
    pub tree: bool,

    /// Start with this filter.
    #[arg(long, value_name = "WORDS")]
    pub filter: Option<String>,

    /// Measure: take N samples and draw N frames off screen, print the CPU time of each.
    #[arg(long, value_name = "N", hide = true)]
    pub bench_frames: Option<u32>,
}

/// Options of `gpuproc gpus`.
#[derive(Debug, clap::Args)]
pub struct GpusArgs {
    /// Print the full snapshot as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Redraw every SECONDS seconds until interrupted.
    #[arg(long, value_name = "SECONDS", value_parser = parse_interval)]
    pub watch: Option<f64>,

    /// When to colour the table.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    /// Do not list the processes under each GPU.
    #[arg(long)]
    pub no_processes: bool,

    /// Add lines under each GPU: PCIe link and traffic, NVLink, BAR1, encoder and decoder,
    /// energy, clock event (throttle) reasons, ECC counts and retired or remapped memory.
    #[arg(long, short = 'd')]
    pub details: bool,

    /// The GPUs of many nodes, asked through Slurm: the current allocation's nodes, or
    /// --partition's, or --nodes, or every node; each runs this gpuproc (same path) as a
    /// step, and its GPU processes are shown with their Slurm job, step and user.
    #[arg(long, conflicts_with = "details")]
    pub slurm: bool,

    /// Like --slurm, through `ssh NODE` for clusters without Slurm (needs --nodes).
    #[arg(long, conflicts_with_all = ["slurm", "details"])]
    pub ssh: bool,

    /// With --slurm: the nodes of this partition.
    #[arg(long, value_name = "PARTITION", requires = "slurm")]
    pub partition: Option<String>,

    /// With --slurm or --ssh: these nodes (Slurm's host list syntax: node[1-4],gpu7).
    #[arg(long, value_name = "LIST")]
    pub nodes: Option<String>,

    /// With --slurm or --ssh: a node that has not answered after this many seconds is shown
    /// as silent, and the others are shown without it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_interval)]
    pub node_timeout: f64,

    /// Add each GPU process's Slurm job step and user to the JSON (what --slurm asks each
    /// node for).
    #[arg(long, hide = true, requires = "json")]
    pub slurm_jobs: bool,
}

/// `--color` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Colour when standard output is a terminal.
    Auto,
    /// Always colour.
    Always,
    /// Never colour.
    Never,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.1 => Ok(v),
        _ => Err(format!(
            "expected a number of seconds of at least 0.1, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn watch_interval() {
        assert_eq!(parse_interval("2"), Ok(2.0));
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("nan").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn a_huge_watch_interval_saturates() {
        for huge in ["1e20", "1e300"] {
            let seconds = parse_interval(huge).expect(huge);
            assert_eq!(
                crate::units::seconds(seconds),
                std::time::Duration::MAX,
                "{huge}"
            );
        }
    }
}
