//! The `gpuproc` command-line tool: list GPUs and their processes (`gpuproc gpus`), watch
//! them (`gpuproc top`).

mod cli;
mod cmd;
mod gate;
mod run;
mod table;
mod top;
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
            let no_driver = err
                .downcast_ref::<gpuproc::gpu::GpuError>()
                .is_some_and(|e| e.is_no_driver());
            let _ = writeln!(io::stderr(), "gpuproc: {}", report(&err));
            ExitCode::from(if no_driver {
                cli::EXIT_NO_DRIVER
            } else {
                cli::EXIT_ERROR
            })
        }
    }
}

/// The error and its causes on one line, each cause once: `what: why: deeper why`. A cause
/// whose text the previous message already quotes (some libraries repeat their source in
/// their message) is left out.
fn report(err: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut last = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !text.is_empty() && !last.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        last = text;
    }
    line
}

/// A closed pipe (`gpuproc gpus | head`) is how the reader says it has enough.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}
