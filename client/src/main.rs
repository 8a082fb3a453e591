//! `ferry`: command line client of `ferryd`.

mod cli;
mod cmd_cluster;
mod cmd_evacuate;
mod cmd_instance;
mod cmd_operation;
mod ctx;
mod output;
mod progress;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command};
use ctx::Ctx;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: &Cli) -> Result<i32> {
    let ctx = Ctx {
        client: ctx::connect(cli)?,
        format: cli.format,
    };
    match &cli.command {
        Command::Launch(a) => cmd_instance::launch(&ctx, a).await,
        Command::List => cmd_instance::list(&ctx).await,
        Command::Info { name } => cmd_instance::info(&ctx, name).await,
        Command::Start { name } => cmd_instance::start(&ctx, name).await,
        Command::Stop(a) => cmd_instance::stop(&ctx, a).await,
        Command::Restart(a) => cmd_instance::restart(&ctx, a).await,
        Command::Delete(a) => cmd_instance::delete(&ctx, a).await,
        Command::Exec(a) => cmd_instance::exec(&ctx, a).await,
        Command::Console(a) => cmd_instance::console(&ctx, a).await,
        Command::Operation(c) => cmd_operation::run(&ctx, c).await,
        Command::Cluster(c) => cmd_cluster::run(&ctx, c).await,
        Command::Move(a) => cmd_cluster::move_instance(&ctx, a).await,
        Command::Config(c) => cmd_cluster::config(&ctx, c).await,
    }
}
