//! `gpuproc run`: spread a queue of shell commands over GPUs (see [`crate::run`]).

use crate::run::RunArgs;

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    crate::run::run(args)
}
