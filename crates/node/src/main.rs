//! The `meshnode` command. The only place that exits the process.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshnode::config::{load_or_create_identity, parse_neighbor};
use meshnode::{Config, client};
use meshnode_protocol::Identity;
use meshnode_protocol::ui::{DEFAULT_UI_PORT, StatusPayload};
use tracing_subscriber::EnvFilter;

const DEFAULT_UI: &str = "127.0.0.1:5333";

/// A peer node daemon that leaves the network gracefully.
#[derive(Debug, Parser)]
#[command(name = "meshnode", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until it is stopped (Ctrl-C or SIGTERM).
    Run(RunArgs),
    /// Print the status of a running node.
    Status {
        /// The node's UI address.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_UI)]
        ui: SocketAddr,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where to accept neighbors (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where the UI websocket and HTTP routes listen.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_UI)]
    ui: SocketAddr,
    /// A neighbor to dial and keep dialing, as HOST:PORT (repeatable).
    #[arg(long = "neighbor", value_name = "HOST:PORT", value_parser = parse_neighbor)]
    neighbors: Vec<String>,
    /// Load the node's key from PATH, or create it there; without it the key lives only as long
    /// as the process.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Status { ui } => runtime.block_on(status(ui)),
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn fail(message: &str) -> ExitCode {
    eprintln!("meshnode: error: {message}");
    ExitCode::FAILURE
}

async fn run(args: RunArgs) -> ExitCode {
    let identity = match &args.key_file {
        Some(path) => load_or_create_identity(path).map_err(|e| e.to_string()),
        None => Identity::generate().map_err(|e| e.to_string()),
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => return fail(&e),
    };
    let mut config = Config::new(identity);
    config.listen = args.listen;
    config.ui = args.ui;
    config.neighbors = args.neighbors;
    let node = match meshnode::start(config).await {
        Ok(node) => node,
        Err(e) => return fail(&e.to_string()),
    };
    tracing::info!(node = %node.id(), listen = %node.listen_addr(), ui = %node.ui_addr(), "meshnode running; stop it with Ctrl-C or SIGTERM");
    match stop_signal().await {
        Ok(signal) => tracing::info!(signal, "stopping"),
        Err(e) => return fail(&format!("cannot listen for stop signals: {e}")),
    }
    if node.stop().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Waits for SIGINT or SIGTERM and names the one that came.
async fn stop_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

async fn status(ui: SocketAddr) -> ExitCode {
    match client::status(ui).await {
        Ok(status) => {
            print!("{}", render_status(&status));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = if ui.port() == DEFAULT_UI_PORT {
                ""
            } else {
                " (is --ui right?)"
            };
            fail(&format!("{e}{hint}"))
        }
    }
}

fn render_status(s: &StatusPayload) -> String {
    use std::fmt::Write;
    let short = |id: &str| id.get(..8).unwrap_or(id).to_owned();
    let mut out = String::new();
    let _ = writeln!(out, "node       {}", s.node_id);
    let state = serde_json::to_value(s.state).unwrap_or_default();
    let _ = writeln!(out, "state      {}", state.as_str().unwrap_or("unknown"));
    let _ = writeln!(out, "listen     {}", s.listen);
    let _ = writeln!(out, "ui         {}", s.ui);
    let _ = writeln!(
        out,
        "version    {} (meshnode {})",
        s.version, s.software_version
    );
    let _ = writeln!(out, "neighbors  {}", s.neighbors.len());
    for n in &s.neighbors {
        let kind = if n.full { "full" } else { "half" };
        let _ = writeln!(out, "  {}  {:<21}  {kind}", short(&n.node_id), n.addr);
    }
    let _ = writeln!(out, "known      {}", s.known_nodes.len());
    for k in &s.known_nodes {
        let neighbors: Vec<String> = k.neighbors.iter().map(|id| short(id)).collect();
        let _ = writeln!(
            out,
            "  {}  {:<21}  v{:<4} -> {}",
            short(&k.node_id),
            k.addr,
            k.version,
            if neighbors.is_empty() {
                "-".to_owned()
            } else {
                neighbors.join(" ")
            }
        );
    }
    let st = &s.stats;
    let _ = writeln!(
        out,
        "gossip     {} frames sent, {} received",
        st.gossip_frames_sent, st.gossip_frames_received
    );
    let _ = writeln!(
        out,
        "records    {} accepted, {} stale, {} rejected",
        st.records_accepted, st.records_stale, st.records_rejected
    );
    let _ = writeln!(
        out,
        "streams    {} open, {} accepted, {} dialed",
        st.streams_open, st.streams_accepted, st.streams_dialed
    );
    let _ = writeln!(
        out,
        "bad input  {} malformed, {} oversized frames, {} gossip frames dropped, {} neighbors disconnected",
        st.frames_malformed,
        st.frames_oversized,
        st.gossip_frames_dropped,
        st.peers_disconnected_for_abuse
    );
    out
}
