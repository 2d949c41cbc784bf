//! One module per subcommand.

mod gpus;
mod gpus_cluster;
pub mod pick;
mod run;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gpus(args) => gpus::run(&args),
        Command::Pick(args) => pick::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Top(args) => crate::top::run(&args),
        Command::SlurmJob(args) => crate::run::slurm::wrapper::run(&args),
    }
}
