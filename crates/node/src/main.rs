//! The `meshnode` command. The only place that exits the process.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use meshnode::config::{
    Advertise, LogFormat, UiToken, advertised_addr, load_or_create_identity, parse_duration,
    parse_neighbor,
};
use meshnode::ui_gateway::{AllowedHost, AllowedOrigin, UI_GRACE};
use meshnode::{Config, ShutdownReport, client};
use meshnode_protocol::Identity;
use meshnode_protocol::ui::{DEFAULT_UI_PORT, StatusPayload, codes, short_id};
use serde_json::json;
use tracing_subscriber::EnvFilter;

const DEFAULT_UI: &str = "127.0.0.1:5333";
/// The environment variable that can hold the UI token instead of `--ui-token`.
const UI_TOKEN_ENV: &str = "MESHNODE_UI_TOKEN";
/// How long `meshnode shutdown` waits for the node's answer (as MASQ's `masq` does).
const SHUTDOWN_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the exit waits for the last notices to systemd.
const NOTIFY_FLUSH: Duration = Duration::from_secs(1);
/// How long `meshnode shutdown` waits for its probe of the UI port.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// A peer node daemon that leaves the network gracefully.
#[derive(Debug, Parser)]
#[command(name = "meshnode", version, about, long_about = None)]
struct Cli {
    /// How logs are written to stderr: text for people, or json (one object per line).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The log format chosen at start, for the few messages written outside `tracing`.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until it is shut down (through its UI, or with SIGTERM or Ctrl-C).
    #[command(
        after_help = "Exit codes: 0 graceful shutdown; 3 the shutdown deadline expired; \
        1 any other failure; 2 usage error; 128+N a second signal N during the shutdown."
    )]
    Run(RunArgs),
    /// Print the status of a running node.
    Status {
        /// The node's UI address.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_UI)]
        ui: SocketAddr,
        /// The node's UI token, if it has one.
        #[arg(long, value_name = "TOKEN", env = UI_TOKEN_ENV, hide_env_values = true, value_parser = UiTokenParser)]
        ui_token: Option<UiToken>,
    },
    /// Shut a running node down gracefully and print its report. Exits 0 when the shutdown was
    /// graceful, 3 when its deadline expired, 1 otherwise.
    Shutdown {
        /// The node's UI address.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_UI)]
        ui: SocketAddr,
        /// The node's UI token, if it has one.
        #[arg(long, value_name = "TOKEN", env = UI_TOKEN_ENV, hide_env_values = true, value_parser = UiTokenParser)]
        ui_token: Option<UiToken>,
    },
    /// Start a local mesh on loopback, show one node withdrawing gracefully, then stop them all.
    /// With --console, keep the mesh running and watch it in a browser instead.
    Demo {
        /// How many nodes the mesh has.
        #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=64))]
        nodes: u16,
        /// Keep the mesh running, print each node's console URL (http://ADDR/), and let people
        /// shut nodes down from the page and watch the others react, until Ctrl-C.
        #[arg(long)]
        console: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where to accept neighbors (port 0 picks a free port). A wildcard (0.0.0.0, [::]) needs
    /// --advertise.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The address neighbors dial, put in the node's record instead of the listen address: for
    /// a wildcard --listen, or behind NAT. Never a wildcard nor port 0.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<Advertise>,
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
    /// Longest a graceful shutdown may take, from its first trigger to the exit (then the
    /// process exits with code 3), e.g. 5s or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    shutdown_deadline: Duration,
    /// Drop a neighbor that has sent nothing (not even a keepalive) for this long, as if it had
    /// crashed; links send keepalives at a third of the peer's timeout, e.g. 15s or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    neighbor_timeout: Duration,
    /// Require every UI request to carry `Authorization: Bearer TOKEN` (HTTP 401 otherwise).
    /// Meant for a UI beyond loopback; MASQ's `masq` sends no token.
    #[arg(long, value_name = "TOKEN", env = UI_TOKEN_ENV, hide_env_values = true, value_parser = UiTokenParser)]
    ui_token: Option<UiToken>,
    /// Also answer UI requests whose Host header names NAME (repeatable). Against DNS
    /// rebinding, the UI otherwise answers only IP addresses and `localhost` (HTTP 403 for any
    /// other name); `*` allows any name, with a warning at start.
    #[arg(long = "ui-allow-host", value_name = "NAME", value_parser = AllowedHost::parse)]
    ui_allow_hosts: Vec<AllowedHost>,
    /// Also serve web pages of ORIGIN, given as scheme://host[:port] (repeatable). A browser's
    /// request from any page but the UI's own gets HTTP 403 (websockets included); `*` allows
    /// every site, with a warning at start. Clients that send no Origin (masq, curl, meshnode)
    /// are not concerned.
    #[arg(long = "ui-allow-origin", value_name = "ORIGIN", value_parser = AllowedOrigin::parse)]
    ui_allow_origins: Vec<AllowedOrigin>,
}

/// Parses `--ui-token` (or the environment variable) into a [`UiToken`]. Unlike clap's usual
/// errors, a refusal never repeats the value: it is a secret.
#[derive(Debug, Clone, Copy)]
struct UiTokenParser;

impl clap::builder::TypedValueParser for UiTokenParser {
    type Value = UiToken;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<UiToken, clap::Error> {
        let refuse = |why: &str| {
            let message = format!("invalid --ui-token (or {UI_TOKEN_ENV}): {why}\n");
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("it is not UTF-8"))?;
        UiToken::new(text).map_err(|why| refuse(&why))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        // A usage error, as a bad flag is (exit code 2), before anything starts.
        if let Err(e) = advertised_addr(args.listen, args.advertise.as_ref()) {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit();
        }
    }
    let quiet = matches!(
        cli.command,
        Command::Demo { .. } | Command::Shutdown { .. } | Command::Status { .. }
    );
    init_logging(if quiet { "warn" } else { "info" }, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let code = match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Status { ui, ui_token } => runtime.block_on(status(ui, ui_token)),
        Command::Shutdown { ui, ui_token } => runtime.block_on(shutdown(ui, ui_token)),
        Command::Demo { nodes, console } => runtime.block_on(demo(nodes.into(), console)),
    };
    // Whatever is still running (a DNS lookup of a dialer, say) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(50));
    code
}

fn init_logging(default: &str, format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // Timestamp, level, target, the event's fields (its message among them), the current
        // span and the span list: the same fields as the text, as one object per line.
        LogFormat::Json => logs.json().init(),
    }
}

fn fail(message: &str) -> ExitCode {
    match LOG_FORMAT.get() {
        // Every line on stderr is then a JSON object, this one too.
        Some(LogFormat::Json) => tracing::error!(error = message, "meshnode failed"),
        _ => eprintln!("meshnode: error: {message}"),
    }
    ExitCode::FAILURE
}

async fn run(args: RunArgs) -> ExitCode {
    // Listen for signals before anything else, so that one arriving while the node starts is
    // honoured as soon as it runs.
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => return fail(&format!("cannot listen for signals: {e}")),
    };
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
    config.shutdown_deadline = args.shutdown_deadline;
    config.neighbor_timeout = args.neighbor_timeout;
    config.ui_token = args.ui_token;
    for host in args.ui_allow_hosts {
        config.ui_web.allow_host(host);
    }
    for origin in args.ui_allow_origins {
        config.ui_web.allow_origin(origin);
    }
    config.advertise = args.advertise;
    let node = match meshnode::start(config).await {
        Ok(node) => node,
        Err(e) => return fail(&e.to_string()),
    };
    tracing::info!(node = %node.id(), listen = %node.listen_addr(), ui = %node.ui_addr(), "meshnode running; shut it down through its UI, with SIGTERM or with Ctrl-C");

    let controller = node.controller();
    // systemd's Type=notify, when it asked: READY now, then the node's progress.
    let notifier = meshnode::notify::Notifier::start().map(|(notifier, drained)| {
        let stop = tokio_util::sync::CancellationToken::new();
        let follow = meshnode::notify::follow(
            notifier.clone(),
            node.lifecycle(),
            node.connectivity(),
            controller.clone(),
            stop.clone(),
        );
        (notifier, drained, stop, tokio::spawn(follow))
    });
    let code = wait_for_the_end(node, controller, signals, args.shutdown_deadline).await;
    if let Some((notifier, drained, stop, mut follow)) = notifier {
        stop.cancel();
        if tokio::time::timeout(NOTIFY_FLUSH, &mut follow)
            .await
            .is_err()
        {
            follow.abort();
        }
        if let Ok(report) = &code {
            notifier.send(vec![meshnode::notify::stopped(report)]);
        }
        drop(notifier);
        // The follower's copy goes with its task; the last line is out before the exit.
        tokio::task::block_in_place(|| drained.wait(NOTIFY_FLUSH));
    }
    match code {
        Ok(report) => ExitCode::from(report.exit_code()),
        Err(code) => code,
    }
}

/// Runs until the node ends (its report) or a signal forces the exit (the exit code).
async fn wait_for_the_end(
    node: meshnode::Node,
    controller: meshnode::NodeController,
    mut signals: Signals,
    shutdown_deadline: Duration,
) -> Result<ShutdownReport, ExitCode> {
    let wait = node.wait();
    tokio::pin!(wait);
    // Past this after a signal, the node is wedged: the gateway's own deadline should have
    // ended it long before.
    let watchdog = shutdown_deadline + UI_GRACE + meshnode::notify::EXTEND_MARGIN;
    let mut signalled: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            report = &mut wait => return Ok(report),
            signal = signals.recv() => {
                if signalled.is_some() {
                    tracing::warn!(signal = signal.name, "second signal during the shutdown: exiting at once");
                    return Err(ExitCode::from(128 + signal.number));
                }
                tracing::info!(signal = signal.name, "shutting down gracefully; send it again to exit at once");
                signalled = Some(tokio::time::Instant::now() + watchdog);
                // From a task of its own, so that this loop keeps listening for a second
                // signal even if the gateway's inbox is full.
                let controller = controller.clone();
                tokio::spawn(async move {
                    if controller.signal(signal.name).await.is_err() {
                        tracing::warn!("the node is already ending");
                    }
                });
            }
            () = sleep_until(signalled) => {
                return Err(fail("the node did not end in time after the signal"));
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A stop signal: its name and number.
struct Signal {
    name: &'static str,
    number: u8,
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal { name: "SIGTERM", number: 15 },
                _ = self.int.recv() => Signal { name: "SIGINT", number: 2 },
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            Signal {
                name: "Ctrl-C",
                number: 2,
            }
        }
    }
}

async fn shutdown(ui: SocketAddr, token: Option<UiToken>) -> ExitCode {
    say(format_args!("asking the node at {ui} to shut down\n"));
    let mut client = match client::UiClient::connect_with(ui, token.as_ref()).await {
        Ok(client) => client,
        Err(e) => return fail(&e.to_string()),
    };
    say(format_args!(
        "waiting while it withdraws from the network\n"
    ));
    let answer = client
        .request_within(
            "shutdown",
            json!({ "report": true }),
            SHUTDOWN_ANSWER_TIMEOUT,
            |_| {},
        )
        .await;
    client.close().await;
    let report: ShutdownReport = match answer.map(|m| m.into_payload()) {
        Ok(Ok(report)) => report,
        Ok(Err(e)) if e.code == codes::NODE_NOT_RUNNING => {
            return fail(&format!("the node is not running: {}", e.message));
        }
        Ok(Err(e)) => {
            return fail(&format!(
                "the node answered error {}: {}",
                e.code, e.message
            ));
        }
        Err(e) => return fail(&e.to_string()),
    };
    say(format_args!("{}", report.render()));
    // As `masq shutdown` does: a node that has shut down refuses new connections on its UI.
    let probe = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(ui)).await;
    match probe {
        Ok(Ok(_)) => {
            say(format_args!("the node still answers on {ui}\n"));
            return ExitCode::FAILURE;
        }
        _ => say(format_args!("the node stopped answering on {ui}\n")),
    }
    ExitCode::from(report.exit_code())
}

/// Writes to standard output for a person. A closed pipe (`meshnode shutdown | head`) is not an
/// error worth a panic: the command still does its work and exits with its own code.
fn say(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(text).and_then(|()| out.flush());
}

async fn demo(nodes: usize, console: bool) -> ExitCode {
    if console {
        let ctrl_c = async {
            if tokio::signal::ctrl_c().await.is_err() {
                // No signal handler: run until every node has been shut down from its page.
                std::future::pending::<()>().await;
            }
        };
        return match meshnode::demo::console(nodes, |text| say(format_args!("{text}\n")), ctrl_c)
            .await
        {
            Ok(reports) if reports.iter().all(|r| r.exit_code() == 0) => ExitCode::SUCCESS,
            Ok(_) => fail("a node did not shut down gracefully"),
            Err(e) => fail(&e.to_string()),
        };
    }
    match meshnode::demo::run(nodes, |text| say(format_args!("{text}\n"))).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

async fn status(ui: SocketAddr, token: Option<UiToken>) -> ExitCode {
    match client::status_with(ui, token.as_ref()).await {
        Ok(status) => {
            say(format_args!("{}", render_status(&status)));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = if ui.port() == DEFAULT_UI_PORT
                || matches!(e, client::ClientError::Unauthorized { .. })
            {
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
        let _ = writeln!(out, "  {}  {:<21}  {kind}", short_id(&n.node_id), n.addr);
    }
    let _ = writeln!(out, "known      {}", s.known_nodes.len());
    for k in &s.known_nodes {
        let neighbors: Vec<&str> = k.neighbors.iter().map(|id| short_id(id)).collect();
        let _ = writeln!(
            out,
            "  {}  {:<21}  v{:<4} -> {}",
            short_id(&k.node_id),
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
        "gossip     {} frames sent, {} received ({} changed nothing)",
        st.gossip_frames_sent, st.gossip_frames_received, st.gossip_frames_useless
    );
    let _ = writeln!(
        out,
        "records    {} accepted, {} stale, {} rejected",
        st.records_accepted, st.records_stale, st.records_rejected
    );
    let _ = writeln!(
        out,
        "streams    {} open, {} accepted, {} dialed, {} refused at the limit",
        st.streams_open, st.streams_accepted, st.streams_dialed, st.streams_refused
    );
    let _ = writeln!(
        out,
        "links      {} handshakes refused, {} failed, {} neighbors timed out, {} unknown frames skipped",
        st.handshakes_refused, st.handshakes_failed, st.peers_timed_out, st.frames_unknown
    );
    let _ = writeln!(
        out,
        "digests    {} sent ({} bytes), {} received, {} records repaired",
        st.digests_sent, st.digest_bytes_sent, st.digests_received, st.records_repaired
    );
    let _ = writeln!(
        out,
        "bad input  {} malformed, {} oversized frames, {} gossip rounds deferred, {} neighbors disconnected",
        st.frames_malformed,
        st.frames_oversized,
        st.gossip_deferred,
        st.peers_disconnected_for_abuse
    );
    out
}
