//! `meshnode-bench`: how fast a node withdraws, against the physical floor and against a crash.
#![forbid(unsafe_code)]

mod mesh;
mod peer;
mod shutdown;
mod stats;

use std::process::ExitCode;

use clap::Parser;

/// meshnode's benchmarks. Every scenario prints a table; --json writes every figure.
#[derive(Debug, Parser)]
#[command(name = "meshnode-bench", version, about)]
struct Args {
    /// Neighbor counts for the shutdown scenario.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,5000")]
    neighbors: Vec<usize>,
    /// Mesh size.
    #[arg(long)]
    mesh: Option<usize>,
    /// Gossip window, ms.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Runs per point.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        eprintln!("meshnode-bench: error: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        if let Some(m) = args.mesh {
            match mesh::summary(m, 4, 3, std::time::Duration::from_millis(args.window)).await {
                Ok(s) => println!(
                    "mesh {m}: graceful learned {} frames/edge {}; crash learned {} frames/edge {}",
                    s.graceful_learned_ms.cell(),
                    s.graceful_frames_per_edge.cell(),
                    s.crash_learned_ms.cell(),
                    s.crash_frames_per_edge.cell()
                ),
                Err(e) => {
                    eprintln!("meshnode-bench: error: {e}");
                    return ExitCode::FAILURE;
                }
            }
            return ExitCode::SUCCESS;
        }
        for &n in &args.neighbors {
            match shutdown::point(n, args.repeat).await {
                Ok(p) => println!(
                    "{n:>5}  a {}  b {}  c {}  floor b {}  ratio {:.2}  frames {:?} graceful {}",
                    p.withdrawal_ms.cell(),
                    p.eof_ms.cell(),
                    p.done_ms.cell(),
                    p.floor_eof_ms.cell(),
                    p.ratio,
                    p.frames_sent,
                    p.all_graceful
                ),
                Err(e) => {
                    eprintln!("meshnode-bench: error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    })
}
