//! `edge-gateway --config gateway.toml [--listen ADDR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wasmlm_edge_gateway::config::GatewayConfig;

/// One OpenAI-compatible endpoint in front of many wasmlm nodes.
#[derive(Parser)]
#[command(name = "edge-gateway", version)]
struct Cli {
    /// The gateway's config file (nodes, model catalog, keys).
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on (overrides the file's `listen`); port 0 picks a free one.
    #[arg(long)]
    listen: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match GatewayConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-gateway: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-gateway: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listen = config.listen.clone();
    match rt.block_on(wasmlm_edge_gateway::server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-gateway: error: {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}
