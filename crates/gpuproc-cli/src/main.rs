//! The `gpuproc` command-line tool: list GPUs and their processes (`gpuproc gpus`).

mod cli;
mod cmd;
mod gate;
mod run;
mod table;
mod units;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    gate::gate_if_asked();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and exit 0; usage errors get their own status.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            if let Some(usage) = err.downcast_ref::<run::UsageError>() {
                let _ = writeln!(io::stderr(), "gpuproc: {usage}");
                return ExitCode::from(cli::EXIT_USAGE);
            }
            if let Some(failed) = err.downcast_ref::<run::RunFailed>() {
                let _ = writeln!(io::stderr(), "gpuproc: {failed}");
                return ExitCode::from(failed.exit_code());
            }
            if let Some((code, message)) = cmd::pick::failure(&err) {
                if let Some(message) = message {
                    let _ = writeln!(io::stderr(), "gpuproc: {message}");
                }
                return ExitCode::from(code);
            }
            let gpu_error = err.downcast_ref::<gpuproc::gpu::GpuError>();
            let no_driver = gpu_error.is_some_and(|e| e.is_no_driver());
            // A GpuError is already one complete sentence; other errors show their causes.
            let _ = match gpu_error {
                Some(e) => writeln!(io::stderr(), "gpuproc: {e}"),
                None => writeln!(io::stderr(), "gpuproc: {err:#}"),
            };
            ExitCode::from(if no_driver {
                cli::EXIT_NO_DRIVER
            } else {
                cli::EXIT_ERROR
            })
        }
    }
}

/// A closed pipe (`gpuproc gpus | head`) is how the reader says it has enough.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}
