//! `meshnode-bench`: how fast a node withdraws, against the physical floor and against a crash.
#![forbid(unsafe_code)]

mod flood;
mod handshake;
mod hops;
mod lacking;
mod memory;
mod mesh;
mod operations;
mod peer;
mod plot;
mod shutdown;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::stats::{Spread, ms};

/// meshnode's benchmarks. Each scenario prints a table; --json writes every figure.
#[derive(Debug, Parser)]
#[command(name = "meshnode-bench", version, about)]
struct Args {
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Neighbor counts for the shutdown scenario.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,5000")]
    neighbors: Vec<usize>,
    /// Runs per shutdown point.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Nodes in the mesh scenario.
    #[arg(long, default_value_t = 100)]
    mesh_nodes: usize,
    /// About how many neighbors each mesh node has.
    #[arg(long, default_value_t = 4)]
    degree: usize,
    /// Rounds of the mesh scenario (a fresh mesh each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The mesh nodes' gossip window, in milliseconds.
    #[arg(long, default_value_t = meshnode::neighborhood::DEFAULT_GOSSIP_WINDOW.as_millis() as u64)]
    gossip_window_ms: u64,
    /// Link handshakes for the handshake scenario.
    #[arg(long, default_value_t = 2000)]
    handshakes: usize,
    /// Neighbors for the memory scenario.
    #[arg(long, default_value_t = 1000)]
    memory_neighbors: usize,
    /// Database sizes for judging the connection stage (operations scenario).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    ops_records: Vec<usize>,
    /// `GET /metrics` requests timed (operations scenario).
    #[arg(long, default_value_t = 200)]
    ops_scrapes: usize,
    /// Honest nodes in the flood scenario (a ring; the attacker links to one of them).
    #[arg(long, default_value_t = 4)]
    flood_nodes: usize,
    /// Records from fresh keys the flood scenario's attacker sends.
    #[arg(long, default_value_t = 100_000)]
    flood_records: usize,
    /// Write every figure as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Draw time to EOF against N, node and floor, as SVG here.
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Shutdown,
    Mesh,
    Memory,
    Handshake,
    Operations,
    Flood,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    machine: Machine,
    shutdown: Vec<shutdown::Point>,
    mesh: Option<mesh::Summary>,
    memory: Option<memory::Memory>,
    handshake: Option<handshake::Rate>,
    operations: Option<operations::Operations>,
    flood: Option<flood::Flood>,
    /// Points that could not be measured, and why.
    failed: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct Machine {
    cores: usize,
    memory_kib: u64,
}

fn main() -> ExitCode {
    // The memory scenario runs its node in a child process of this same program.
    if std::env::args().nth(1).as_deref() == Some("serve-node") {
        return match runtime().map(|rt| rt.block_on(memory::serve_node())) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) | Err(e) => fail(&e),
        };
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("meshnode-bench: error: {message}");
    ExitCode::FAILURE
}

async fn run(args: &Args) -> Result<(), String> {
    let mut results = Results {
        machine: machine(),
        ..Results::default()
    };
    println!(
        "machine: {} cores, {} MiB of memory",
        results.machine.cores,
        results.machine.memory_kib / 1024
    );
    let wants = |s: Scenario| args.scenario == Scenario::All || args.scenario == s;
    if wants(Scenario::Shutdown) {
        println!(
            "\n== shutdown: one node, N neighbors, against the floor, in {} rounds of the floors' runs then the node's, back to back",
            args.repeat
        );
        println!(
            "ms from the request, median [min–max]; node/floor: the median [min–max] of the per-round ratios of (b)"
        );
        println!(
            "floor: the same encrypted links and light neighbors, the frame, FIN, wait for the hang-up, no node; plaintext floor: the same without the cipher"
        );
        println!(
            "{:>6}  {:>22}  {:>22}  {:>22}  {:>22}  {:>22}  {:>20}  {:>20}  {:>9}  frames sent",
            "N",
            "(a) last withdrawal",
            "(b) last EOF",
            "(c) node ended",
            "floor (b)",
            "plaintext floor (b)",
            "node/floor",
            "node/plaintext",
            "load avg"
        );
        for &n in &args.neighbors {
            let p = match shutdown::point(n, args.repeat).await {
                Ok(p) => p,
                Err(e) => {
                    // A point that cannot be set up is reported, and the rest still run.
                    println!("{n:>6}  not measured: {e}");
                    results
                        .failed
                        .push(format!("shutdown with {n} neighbors: {e}"));
                    continue;
                }
            };
            let loads = Spread::of(p.load_average.clone());
            let ratio = |s: &Spread| format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max);
            println!(
                "{:>6}  {:>22}  {:>22}  {:>22}  {:>22}  {:>22}  {:>20}  {:>20}  {:>9}  {:?}{}",
                n,
                p.withdrawal_ms.cell(),
                p.eof_ms.cell(),
                p.done_ms.cell(),
                p.floor_eof_ms.cell(),
                p.plain_floor_eof_ms.cell(),
                ratio(&p.ratios),
                ratio(&p.plain_ratios),
                format!("{:.1}–{:.1}", loads.min, loads.max),
                p.frames_sent,
                if p.all_graceful {
                    ""
                } else {
                    "  (not all graceful)"
                }
            );
            for (i, r) in p.rounds.iter().enumerate() {
                println!(
                    "        round {}: (b) plaintext floor {} ms, floor {} ms, node {} ms; node/floor {:.2}, node/plaintext {:.2}; floors {} the node; load average {:.1}",
                    i + 1,
                    ms(r.plain_floor.eof_ms),
                    ms(r.floor.eof_ms),
                    ms(r.node.eof_ms),
                    r.ratio,
                    r.plain_ratio,
                    if r.floors_first { "before" } else { "after" },
                    r.load_average
                );
            }
            results.shutdown.push(p);
        }
        if let Some(p) = results.shutdown.iter().find(|p| p.neighbors == 1000) {
            let frames_ok = p.frames_sent.iter().all(|&f| f == 1000);
            println!(
                "goal, N = 1000: (b) at most 1.5x the floor: {:.2}x (median of {} paired ratios, {:.2}–{:.2}), {}; against the plaintext floor {:.2}x; frames sent = N: {}",
                p.ratio,
                p.rounds.len(),
                p.ratios.min,
                p.ratios.max,
                verdict(p.ratio <= 1.5),
                p.plain_ratios.median,
                verdict(frames_ok)
            );
        }
        if let Some(path) = &args.svg {
            plot::draw(&results.shutdown, path)?;
            println!("plot: {}", path.display());
        }
    }
    if wants(Scenario::Mesh) {
        let window = Duration::from_millis(args.gossip_window_ms);
        println!(
            "\n== mesh: {} nodes of degree about {}, gossip window {} ms; {} rounds",
            args.mesh_nodes, args.degree, args.gossip_window_ms, args.rounds
        );
        let s = mesh::summary(args.mesh_nodes, args.degree, args.rounds, window).await?;
        println!(
            "converged in {} ms after the last node started (median of {} meshes)",
            ms(s.converged_ms.median),
            s.rounds.len()
        );
        println!(
            "{:>10}  {:>30}  {:>26}  {:>26}",
            "", "every node knew after (ms)", "gossip frames per link", "gossip bytes per link"
        );
        println!(
            "{:>10}  {:>30}  {:>26}  {:>26}",
            "graceful",
            s.graceful_learned_ms.cell(),
            s.graceful_frames_per_edge.cell(),
            s.graceful_bytes_per_edge.cell()
        );
        println!(
            "{:>10}  {:>30}  {:>26}  {:>26}",
            "crash",
            s.crash_learned_ms.cell(),
            s.crash_frames_per_edge.cell(),
            s.crash_bytes_per_edge.cell()
        );
        println!(
            "{:>10}  {:>30}  {:>26}  {:>26}",
            "settled",
            format!("{} ms after", mesh::SETTLED_WATCH.as_millis()),
            s.settled_frames_per_edge.cell(),
            s.settled_bytes_per_edge.cell()
        );
        for (i, r) in s.rounds.iter().enumerate() {
            let hops: Vec<String> = r
                .graceful_hops
                .iter()
                .map(|h| format!("{}: {} ({} nodes)", h.hops, ms(h.median_ms), h.nodes))
                .collect();
            println!(
                "  round {}: graceful, median ms by hops from the departed node: {}; {} ms per hop; the process's threads meanwhile ran {} ms and waited for a core {} ms in {} ms",
                i + 1,
                hops.join(", "),
                hops::slope(&r.graceful_hops).map_or("-".into(), ms),
                ms(r.graceful_cpu.ran_ms),
                ms(r.graceful_cpu.waited_ms),
                ms(r.graceful_cpu.wall_ms)
            );
            println!(
                "  round {}: {:.1} s to start the nodes, converged {} ms later with {} records repaired by digests; digests then {:.0} B per node per second (not gossip)",
                i + 1,
                r.started_s,
                ms(r.converged_ms),
                r.repaired_to_converge,
                r.digest_bytes_per_node_s
            );
            println!(
                "  round {}: graceful {} frames / {} B over {} links (then {} frames / {} B settled), crash {} frames / {} B over {} links",
                i + 1,
                r.graceful.frames,
                r.graceful.bytes,
                r.graceful.edges,
                r.graceful.settled_frames,
                r.graceful.settled_bytes,
                r.crash.frames,
                r.crash.bytes,
                r.crash.edges
            );
        }
        println!(
            "goals: every node knows within 30 ms: {} ({} ms); at most 1.5 frames per link: {} ({}); at most a third of a crash's bytes: {} ({} vs {} B per link)",
            verdict(s.graceful_learned_ms.median <= 30.0),
            ms(s.graceful_learned_ms.median),
            verdict(s.graceful_frames_per_edge.median <= 1.5),
            ms(s.graceful_frames_per_edge.median),
            verdict(s.graceful_bytes_per_edge.median * 3.0 <= s.crash_bytes_per_edge.median),
            ms(s.graceful_bytes_per_edge.median),
            ms(s.crash_bytes_per_edge.median)
        );
        results.mesh = Some(s);
    }
    if wants(Scenario::Operations) {
        println!(
            "\n== operations: judging the connection stage (after every neighborhood batch), and GET /metrics"
        );
        let o = operations::measure(&args.ops_records, args.ops_scrapes).await?;
        println!("{:>8}  {:>30}", "records", "connection stage (µs)");
        for p in &o.connectivity {
            println!("{:>8}  {:>30}", p.records, p.judge_us.cell());
        }
        println!(
            "GET /metrics, a new connection each, {} scrapes: {} ms, {} bytes",
            args.ops_scrapes,
            o.scrape_ms.cell(),
            o.scrape_bytes
        );
        results.operations = Some(o);
    }
    if wants(Scenario::Memory) {
        println!(
            "\n== memory: one node with {} neighbors, resident set from /proc",
            args.memory_neighbors
        );
        let m = memory::measure(args.memory_neighbors).await?;
        println!(
            "before {} KiB, after {} KiB: {:.1} KiB per neighbor connection; goal at most 32 KiB: {}",
            m.rss_before_kib,
            m.rss_after_kib,
            m.per_neighbor_kib,
            verdict(m.per_neighbor_kib <= 32.0)
        );
        results.memory = Some(m);
    }
    if wants(Scenario::Handshake) {
        println!(
            "\n== handshake: {} link handshakes (Noise XX and identity proof, both ends in this process) on loopback",
            args.handshakes
        );
        let rate = handshake::measure(args.handshakes).await?;
        println!(
            "{} handshakes in {:.0} ms: {:.0} handshakes per second on {} cores",
            rate.handshakes, rate.elapsed_ms, rate.per_second, results.machine.cores
        );
        results.handshake = Some(rate);
    }
    if wants(Scenario::Flood) {
        println!(
            "\n== flood: {} honest nodes in a ring; an attacker linked to one sends {} records of fresh keys",
            args.flood_nodes, args.flood_records
        );
        let window = Duration::from_millis(args.gossip_window_ms);
        let f = flood::measure(args.flood_nodes, args.flood_records, window).await?;
        print_flood(&f);
        results.flood = Some(f);
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("\nfigures: {}", path.display());
    }
    Ok(())
}

fn print_flood(f: &flood::Flood) {
    println!(
        "{} records in {} frames, generated and signed beforehand in {:.0} ms; written in {:.0} ms; {} {:.0} ms",
        f.records,
        f.frames,
        f.generate_ms,
        f.send_ms,
        if f.died_down {
            "every node's counters still after"
        } else {
            "NOT died down: counters still moving after"
        },
        f.absorbed_ms
    );
    println!(
        "process resident memory (every node, the attacker and its frames): {} KiB before, {} KiB at most during, {} KiB after",
        f.rss_before_kib, f.rss_peak_kib, f.rss_after_kib
    );
    println!(
        "{:>5}  {:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>13}",
        "hops", "stored", "accepted", "dropped", "stale", "rejected", "disconnected"
    );
    for n in &f.per_node {
        println!(
            "{:>5}  {:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>13}",
            n.hops, n.stored, n.accepted, n.dropped, n.stale, n.rejected, n.disconnected_for_abuse
        );
    }
    println!(
        "attacker: {} ({})",
        if f.attacker_disconnected {
            "disconnected"
        } else {
            "not disconnected"
        },
        f.attacker_end
    );
    for (what, j) in [
        ("without the flood", &f.join_quiet),
        ("during the flood", &f.join_flood),
    ] {
        println!(
            "an honest node joins, {what}: {} of {} nodes stored it, {}; full neighborship everywhere afterwards: {}",
            j.reached,
            j.nodes,
            j.learned_ms.map_or_else(
                || "not all in time".to_owned(),
                |ms| format!("all after {ms:.0} ms")
            ),
            j.full_everywhere
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    Machine { cores, memory_kib }
}
