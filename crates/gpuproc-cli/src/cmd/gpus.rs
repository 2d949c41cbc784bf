//! `gpuproc gpus`: a table like gpustat, or the snapshot as JSON.

use std::io::{self, IsTerminal, Write};

use anyhow::Context;
use gpuproc::gpu::Gpus;

use crate::cli::{ColorChoice, GpusArgs};
use crate::table::{render, Style};

/// Clears the terminal and moves the cursor home before each redraw.
const CLEAR: &str = "\x1b[H\x1b[2J";

pub fn run(args: &GpusArgs) -> anyhow::Result<()> {
    if args.slurm || args.ssh {
        return super::gpus_cluster::run(args);
    }
    if args.nodes.is_some() {
        anyhow::bail!("--nodes is for --slurm or --ssh");
    }
    let gpus = Gpus::open()?;
    let stdout = io::stdout();
    let colour = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let style = Style {
        colour,
        processes: !args.no_processes,
        details: args.details,
    };
    loop {
        // The table without --details needs none of the driver's slow counters.
        let snapshot = if args.json || args.details {
            gpus.snapshot()?
        } else {
            gpus.snapshot_without_details()?
        };
        let text = if args.json && args.slurm_jobs {
            let mut value = serde_json::to_value(&snapshot)?;
            super::gpus_cluster::add_slurm_jobs(&mut value);
            let mut json = serde_json::to_string_pretty(&value)?;
            json.push('\n');
            json
        } else if args.json {
            let mut json = serde_json::to_string_pretty(&snapshot)?;
            json.push('\n');
            json
        } else {
            // Leases are advisory here: a missing or unreadable table shows none.
            let leases = gpuproc::gpu::leases()
                .map(|t| t.leases().to_vec())
                .unwrap_or_default();
            render(&snapshot, &leases, style)
        };
        let mut out = stdout.lock();
        if args.watch.is_some() && stdout.is_terminal() {
            out.write_all(CLEAR.as_bytes())?;
        }
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("writing to standard output")?;
        drop(out);
        match args.watch {
            Some(seconds) => std::thread::sleep(crate::units::seconds(seconds)),
            None => return Ok(()),
        }
    }
}
