//! One module per subcommand.

mod gpus;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gpus(args) => gpus::run(&args),
    }
}
