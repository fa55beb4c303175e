//! The graceful shutdown across all three subsystems, in paused time over in-memory streams:
//! the happy path, the order of gossip and FIN under a backlog, repeated requests, the
//! neighbors' side, and subsystems that never answer or panic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::{Frame, NodeId, SignedRecord};
use meshnode_shutdown::Outcome;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::neighborhood::{DEFAULT_GOSSIP_WINDOW, NeighborhoodHandle, NeighborhoodMsg};
use crate::stream_handler_pool::{PoolCounters, PoolHandle, PoolMsg};
use crate::test_support::{Peer, identity, record, within};
use crate::ui_gateway::{
    self, DEFAULT_SHUTDOWN_DEADLINE, GatewayConfig, GatewayHandle, NodeInfo, ShutdownOutcome,
    ShutdownReport, Trigger,
};
use crate::{Config, Node};

const PIPE: usize = 64 * 1024;

async fn node(seed: u8) -> Node {
    within("start", crate::start(Config::new(identity(seed))))
        .await
        .expect("the node starts")
}

/// `peers` neighbors, handshaken and caught up with the node's record that lists them all.
async fn neighbors(node: &Node, seeds: std::ops::Range<u8>) -> Vec<Peer> {
    let mut peers = Vec::new();
    for seed in seeds {
        let (mut peer, stream) = Peer::new(identity(seed), PIPE);
        assert!(node.adopt(stream).await, "the pool takes the stream");
        peer.handshake().await;
        peers.push(peer);
    }
    let all: BTreeSet<NodeId> = peers.iter().map(Peer::id).collect();
    for peer in &mut peers {
        peer.until_node_lists(node.id(), &all).await;
    }
    peers
}

/// `peer` lists the node back (and `also`): its record at version 2 makes the neighborship full,
/// so that what the node hears of it is forwarded (only reachable records are). Returns once the
/// node stores that record.
async fn lists_back(node: &Node, peer: &mut Peer, also: &[NodeId]) -> SignedRecord {
    let mut listed = also.to_vec();
    listed.push(node.id());
    let update = record(&peer.identity, 2, &listed);
    peer.send(&Frame::Gossip {
        records: vec![update.clone()],
    })
    .await;
    let id = peer.id().to_string();
    within("the node stores the record listing it back", async {
        while !node
            .status()
            .await
            .expect("status")
            .known_nodes
            .iter()
            .any(|k| k.node_id == id && k.version == 2)
        {}
    })
    .await;
    update
}

/// Reads gossip until `record` arrives.
async fn until_record(peer: &mut Peer, record: &SignedRecord) {
    loop {
        match peer.next().await {
            Some(Frame::Gossip { records }) if records.contains(record) => return,
            Some(Frame::Gossip { .. }) => {}
            other => panic!("gossip expected, got {other:?}"),
        }
    }
}

/// Each peer reads to the end of its stream in a task of its own, then hangs up, as a meshnode
/// neighbor does.
fn read_to_end(peers: Vec<Peer>) -> Vec<tokio::task::JoinHandle<Vec<Vec<SignedRecord>>>> {
    peers
        .into_iter()
        .map(|mut peer| tokio::spawn(async move { peer.rest().await }))
        .collect()
}

fn is_withdrawal(frame: &[SignedRecord], node: NodeId) -> bool {
    frame
        .iter()
        .any(|r| r.id() == node && r.record.neighbors.is_empty())
}

#[tokio::test(start_paused = true)]
async fn every_neighbor_gets_exactly_one_withdrawal_gossip_then_eof() {
    let node = node(1).await;
    let me = node.id();
    let peers = neighbors(&node, 10..14).await;
    let version = node.status().await.expect("status").version;
    let readers = read_to_end(peers);
    let mut withdrawn_at = Vec::new();

    let started = tokio::time::Instant::now();
    let report = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.trigger, Trigger::Api);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "well under the deadline"
    );
    assert_eq!(report.subsystems.subsystem, "stream_handler_pool");
    assert_eq!(report.subsystems.summary, "closed 4 streams");
    let hood = &report.subsystems.children[0];
    assert_eq!(
        (hood.subsystem.as_str(), hood.summary.as_str()),
        ("neighborhood", "notified 4 neighbors")
    );
    assert!(report.still_running.is_empty());

    for reader in readers {
        let frames = within("the peer reads to EOF", reader)
            .await
            .expect("no panic");
        let last = frames.last().expect("at least the withdrawal");
        assert_eq!(
            last.len(),
            1,
            "the withdrawal carries only the node's record"
        );
        assert_eq!(last[0].id(), me);
        // Versions follow the wall clock: one bump is any higher version, the same for all.
        assert!(last[0].version() > version, "a newer version");
        withdrawn_at.push(last[0].version());
        assert!(last[0].record.neighbors.is_empty());
        last[0].verify().expect("signed by the node");
        let withdrawals = frames.iter().filter(|f| is_withdrawal(f, me)).count();
        assert_eq!(withdrawals, 1, "exactly one withdrawal gossip, then EOF");
    }
    withdrawn_at.dedup();
    assert_eq!(withdrawn_at.len(), 1, "one version bump for all neighbors");
    let ended = within("the node ends", node.wait()).await;
    assert_eq!(ended, report);
}

#[tokio::test(start_paused = true)]
async fn under_a_backlog_every_queued_frame_and_then_the_withdrawal_precede_the_fin() {
    let node = node(1).await;
    let me = node.id();
    let mut peers = neighbors(&node, 10..12).await;
    let mut slow = peers.pop().expect("two peers");
    let mut relay = peers.pop().expect("two peers");

    // The relay feeds the node records one batch at a time; each becomes a frame queued for
    // the slow neighbor, which reads nothing meanwhile. The relay lists their nodes, and they
    // list it, so they are reachable (only those are forwarded).
    // (Fewer than `BUSY_AT`, past which gossip is held back rather than queued.)
    let seeds = 100..112;
    let listed: Vec<NodeId> = seeds.clone().map(|seed| identity(seed).id()).collect();
    lists_back(&node, &mut relay, &listed).await;
    let relayed: Vec<_> = seeds
        .map(|seed| record(&identity(seed), 1, &[relay.id()]))
        .collect();
    for r in &relayed {
        relay
            .send(&Frame::Gossip {
                records: vec![r.clone()],
            })
            .await;
        let id = r.id().to_string();
        within("the node stores the relayed record", async {
            loop {
                let status = node.status().await.expect("status");
                if status.known_nodes.iter().any(|k| k.node_id == id) {
                    break;
                }
            }
        })
        .await;
        // Past the gossip window, so that each record leaves in a frame of its own.
        tokio::time::sleep(2 * DEFAULT_GOSSIP_WINDOW).await;
    }
    let status = node.status().await.expect("status");
    assert_eq!(
        status.neighbors.len(),
        2,
        "the slow neighbor is still a neighbor"
    );
    assert_eq!(status.stats.gossip_deferred, 0);

    let readers = read_to_end(vec![relay]);
    let shutdown = tokio::spawn(async move {
        let report = node.shutdown().await;
        (node, report)
    });
    // Only now does the slow neighbor read: the backlog, then the withdrawal, then EOF.
    let frames = slow.rest().await;
    // And hangs up, as a meshnode neighbor does at EOF.
    drop(slow);
    let (node, report) = within("the shutdown", shutdown).await.expect("no panic");
    let report = report.expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );

    let received: BTreeSet<NodeId> = frames.iter().flatten().map(SignedRecord::id).collect();
    for r in &relayed {
        assert!(received.contains(&r.id()), "a relayed record was lost");
    }
    assert!(
        is_withdrawal(frames.last().expect("frames"), me),
        "the withdrawal is last"
    );
    assert_eq!(frames.iter().filter(|f| is_withdrawal(f, me)).count(), 1);
    for reader in readers {
        let frames = within("the relay reads to EOF", reader)
            .await
            .expect("no panic");
        assert!(is_withdrawal(frames.last().expect("frames"), me));
    }
    within("the node ends", node.wait()).await;
}

#[tokio::test(start_paused = true)]
async fn a_neighbor_that_never_hangs_up_is_named_and_the_rest_of_the_report_survives() {
    let node = node(1).await;
    let me = node.id();
    let mut peers = neighbors(&node, 10..13).await;
    let mut stuck = peers.pop().expect("three peers");
    let stuck_id = stuck.id();
    let readers = read_to_end(peers);
    let shutdown = tokio::spawn(async move {
        let report = node.shutdown().await;
        (node, report)
    });
    // It reads everything, the withdrawal and the EOF included, but keeps its end open.
    let frames = stuck.rest().await;
    assert!(is_withdrawal(frames.last().expect("frames"), me));
    let (node, report) = within("the shutdown", shutdown).await.expect("no panic");
    let report = report.expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::DeadlineExpired,
        "{}",
        report.render()
    );
    assert!(
        report.elapsed_ms < 5000,
        "the pool answered before the gateway's deadline"
    );
    let hood = &report.subsystems.children[0];
    assert_eq!(
        (hood.subsystem.as_str(), hood.summary.as_str()),
        ("neighborhood", "notified 3 neighbors")
    );
    assert_eq!(report.subsystems.summary, "closed 2 of 3 streams");
    assert_eq!(report.still_running.len(), 1);
    assert!(report.still_running[0].starts_with(&format!("stream to {}", stuck_id.short())));
    assert!(
        report.stats.is_some(),
        "the counters made it into the report"
    );
    for reader in readers {
        within("a peer reads to EOF", reader)
            .await
            .expect("no panic");
    }
    drop(stuck);
    within("the node ends", node.wait()).await;
}

#[tokio::test(start_paused = true)]
async fn repeated_requests_from_every_trigger_join_one_shutdown() {
    let node = node(1).await;
    let readers = read_to_end(neighbors(&node, 10..12).await);
    let controller = node.controller();
    let mut asks = Vec::new();
    for _ in 0..3 {
        let c = controller.clone();
        asks.push(tokio::spawn(async move { c.shutdown().await }));
    }
    for _ in 0..2 {
        assert!(controller.signal("SIGTERM").await.is_ok());
    }
    let first = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    for ask in asks {
        let report = within("a joined request", ask).await.expect("no panic");
        assert_eq!(
            report.expect("answered"),
            first,
            "every requester gets the same report"
        );
    }
    assert_eq!(first.requests, 6);
    assert_eq!(first.outcome, ShutdownOutcome::Graceful);
    assert_eq!(
        first.subsystems.children.len(),
        1,
        "the pool was asked once"
    );
    for reader in readers {
        let frames = within("a peer reads to EOF", reader)
            .await
            .expect("no panic");
        assert_eq!(
            frames
                .iter()
                .filter(|f| is_withdrawal(f, node.id()))
                .count(),
            1
        );
    }
    assert_eq!(within("the node ends", node.wait()).await, first);
    // The node is gone: a late request is refused, not answered twice or panicked on.
    assert!(controller.shutdown().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_asked_for_at_once_after_start_is_honoured() {
    let mut config = Config::new(identity(1));
    // A neighbor that is never there: its dialer is in the middle of trying.
    config.neighbors = vec!["127.0.0.1:9".into()];
    let node = within("start", crate::start(config)).await.expect("starts");
    let report = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    assert_eq!(report.subsystems.summary, "closed 0 streams");
    assert_eq!(
        report.subsystems.children[0].summary,
        "no neighbors to notify"
    );
    within("the node ends", node.wait()).await;
}

#[tokio::test(start_paused = true)]
async fn a_neighbor_that_withdraws_is_dropped_in_one_gossip_round_and_its_eof_changes_nothing() {
    let node = node(1).await;
    let me = node.id();
    let mut peers = neighbors(&node, 10..13).await;
    let mut departing = peers.remove(0);
    // A full neighbor: its record reaches the others.
    let full = lists_back(&node, &mut departing, &[]).await;
    for peer in &mut peers {
        until_record(peer, &full).await;
    }
    let version = node.status().await.expect("status").version;
    let mut bumped = 0;

    // The departing neighbor's own record, newer, listing nobody: its withdrawal.
    let withdrawal = record(&departing.identity, 3, &[]);
    departing
        .send(&Frame::Gossip {
            records: vec![withdrawal.clone()],
        })
        .await;
    within("the departure is handled", async {
        loop {
            let status = node.status().await.expect("status");
            if status.neighbors.len() == 2 {
                assert!(status.version > version, "a bump for the departure");
                bumped = status.version;
                break;
            }
        }
    })
    .await;
    // The news leaves once the gossip window has passed.
    tokio::time::sleep(2 * DEFAULT_GOSSIP_WINDOW).await;
    // Its stream closes a moment later; nothing more happens.
    drop(departing);
    within("the stream ends", async {
        while node.status().await.expect("status").stats.streams_open != 2 {}
    })
    .await;
    // A stream stops counting as open only after its end was handed to the neighborhood, so a
    // status asked now is answered after the neighborhood has handled that end.
    let status = node.status().await.expect("status");
    assert_eq!(status.version, bumped, "the EOF changed nothing");

    let readers = read_to_end(peers);
    let report = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    assert_eq!(report.outcome, ShutdownOutcome::Graceful);
    for reader in readers {
        let frames = within("a peer reads to EOF", reader)
            .await
            .expect("no panic");
        assert_eq!(
            frames.len(),
            2,
            "the departure, then this node's own withdrawal: {frames:?}"
        );
        // The withdrawal is passed on alone and at once; the node's own record that drops the
        // departed neighbor waits for the settling delay, which the shutdown cut short.
        assert_eq!(
            frames[0],
            vec![withdrawal.clone()],
            "the departure is passed on alone"
        );
        assert!(is_withdrawal(&frames[1], me));
        assert!(frames[1][0].version() > bumped);
    }
    within("the node ends", node.wait()).await;
}

/// A gateway over a neighborhood and a pool that the test picks, real or played.
struct Rig {
    gateway: GatewayHandle,
    exit: oneshot::Receiver<ShutdownReport>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Rig {
    async fn new(neighborhood: NeighborhoodHandle, pool: PoolHandle) -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let listener = loopback().await;
        let info = NodeInfo {
            node_id: identity(1).id(),
            listen: SocketAddr::from(([127, 0, 0, 1], 1)),
            ui: listener.local_addr().expect("bound"),
        };
        let config = GatewayConfig {
            listener,
            info,
            deadline: DEFAULT_SHUTDOWN_DEADLINE,
        };
        let (gateway, exit) =
            ui_gateway::spawn(config, neighborhood, pool, cancel.clone(), &tracker)
                .expect("the gateway starts");
        Self {
            gateway,
            exit,
            cancel,
            tracker,
        }
    }

    /// Asks for the shutdown; returns the report and how long it took.
    async fn shutdown(self) -> (ShutdownReport, Duration) {
        let started = tokio::time::Instant::now();
        let report = within("the report", self.gateway.shutdown(Trigger::Api))
            .await
            .expect("answered");
        let took = started.elapsed();
        let ended = within("the node ends", self.exit)
            .await
            .expect("the gateway lets go");
        assert_eq!(ended, report);
        assert!(self.cancel.is_cancelled(), "the gateway ends the node");
        self.tracker.close();
        within("every task ends", self.tracker.wait()).await;
        (report, took)
    }
}

async fn loopback() -> TcpListener {
    within(
        "bind",
        TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))),
    )
    .await
    .expect("a free port")
}

/// A pool played by the test: answers counters; `on_shutdown` decides what becomes of the reply.
fn played_pool(
    on_shutdown: fn(meshnode_shutdown::DoneReply, &mut Vec<meshnode_shutdown::DoneReply>),
) -> PoolHandle {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                PoolMsg::Counters { reply } => {
                    let _ = reply.send(PoolCounters::default());
                }
                PoolMsg::Shutdown { reply, .. } => on_shutdown(reply, &mut held),
                _ => {}
            }
        }
    });
    PoolHandle::from_sender(tx)
}

/// A neighborhood played by the test: `on_withdraw` decides what becomes of the reply; it
/// answers no status.
fn played_neighborhood(
    on_withdraw: fn(meshnode_shutdown::DoneReply, &mut Vec<meshnode_shutdown::DoneReply>),
) -> NeighborhoodHandle {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                NeighborhoodMsg::WithdrawFromNetwork { reply, .. } => on_withdraw(reply, &mut held),
                NeighborhoodMsg::OwnRecord { .. } | NeighborhoodMsg::Status { .. } => {}
                _ => {}
            }
        }
    });
    NeighborhoodHandle::from_sender(tx)
}

fn hold(reply: meshnode_shutdown::DoneReply, held: &mut Vec<meshnode_shutdown::DoneReply>) {
    held.push(reply);
}

fn panic_with(reply: meshnode_shutdown::DoneReply, _: &mut Vec<meshnode_shutdown::DoneReply>) {
    let _reply = reply;
    panic!("the subsystem crashed while shutting down");
}

/// A real pool over the given neighborhood, with no streams.
async fn real_pool(neighborhood: NeighborhoodHandle, tracker: &TaskTracker) -> PoolHandle {
    crate::stream_handler_pool::spawn(
        crate::test_support::test_link(identity(1)),
        crate::stream_handler_pool::Verifiers::new(2),
        loopback().await,
        Vec::new(),
        neighborhood,
        CancellationToken::new(),
        tracker,
    )
}

/// The pool answers a little before the gateway's deadline, but a loaded machine can delay that
/// answer past it. The gateway's report then still names the streams the pool said it was
/// waiting for.
#[tokio::test(start_paused = true)]
async fn a_pool_whose_answer_misses_the_deadline_still_has_its_streams_named() {
    const STREAM: &str = "stream to 0a0b0c0d (c7)";
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                PoolMsg::Counters { reply } => {
                    let _ = reply.send(PoolCounters::default());
                }
                PoolMsg::Shutdown { reply, waiting, .. } => {
                    waiting.send_replace(vec![STREAM.to_owned()]);
                    held.push((reply, waiting));
                }
                _ => {}
            }
        }
    });
    let (hood_tx, _hood_rx) = mpsc::channel(16);
    let rig = Rig::new(
        NeighborhoodHandle::from_sender(hood_tx),
        PoolHandle::from_sender(tx),
    )
    .await;
    let (report, took) = rig.shutdown().await;
    assert_eq!(report.outcome, ShutdownOutcome::DeadlineExpired);
    assert_eq!(took, DEFAULT_SHUTDOWN_DEADLINE);
    assert_eq!(report.subsystems.outcome, Outcome::Late);
    assert_eq!(report.still_running, vec!["stream_handler_pool", STREAM]);
    assert!(report.render().contains(STREAM), "{}", report.render());
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_never_answers_ends_the_shutdown_at_exactly_the_deadline_and_is_named() {
    let (hood_tx, _hood_rx) = mpsc::channel(16);
    let rig = Rig::new(NeighborhoodHandle::from_sender(hood_tx), played_pool(hold)).await;
    let (report, took) = rig.shutdown().await;
    assert_eq!(report.outcome, ShutdownOutcome::DeadlineExpired);
    assert_eq!(report.exit_code(), 3);
    assert_eq!(report.elapsed_ms, 5000);
    assert_eq!(
        took, DEFAULT_SHUTDOWN_DEADLINE,
        "answered at the deadline, not after"
    );
    assert_eq!(report.subsystems.outcome, Outcome::Late);
    assert_eq!(report.still_running, vec!["stream_handler_pool"]);
    assert!(
        report
            .render()
            .contains("still running at the deadline: stream_handler_pool")
    );
}

#[tokio::test(start_paused = true)]
async fn a_neighborhood_that_never_answers_is_named_when_the_deadline_expires() {
    let pools = TaskTracker::new();
    let pool = real_pool(played_neighborhood(hold), &pools).await;
    let rig = Rig::new(played_neighborhood(hold), pool).await;
    let (report, took) = rig.shutdown().await;
    assert_eq!(report.outcome, ShutdownOutcome::DeadlineExpired);
    assert_eq!(report.exit_code(), 3);
    // The pool answers a little before the gateway's deadline, naming what it waited for.
    assert!(
        took < DEFAULT_SHUTDOWN_DEADLINE && took >= Duration::from_millis(4800),
        "{took:?}"
    );
    assert_eq!(report.subsystems.outcome, Outcome::Done);
    assert_eq!(report.subsystems.children[0].outcome, Outcome::Late);
    assert_eq!(report.still_running, vec!["neighborhood"]);
}

#[tokio::test(start_paused = true)]
async fn a_neighborhood_that_panics_is_vanished_and_nothing_hangs() {
    let pools = TaskTracker::new();
    let pool = real_pool(played_neighborhood(panic_with), &pools).await;
    let rig = Rig::new(played_neighborhood(hold), pool).await;
    let (report, took) = rig.shutdown().await;
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Failed,
        "{}",
        report.render()
    );
    assert_eq!(report.exit_code(), 1);
    assert!(
        took < Duration::from_secs(1),
        "no wait for the deadline: {took:?}"
    );
    assert_eq!(
        report.subsystems.outcome,
        Outcome::Done,
        "the pool still closed its streams"
    );
    assert_eq!(report.subsystems.children[0].outcome, Outcome::Vanished);
    assert!(report.still_running.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_panics_is_vanished_and_nothing_hangs() {
    let (hood_tx, _hood_rx) = mpsc::channel(16);
    let rig = Rig::new(
        NeighborhoodHandle::from_sender(hood_tx),
        played_pool(panic_with),
    )
    .await;
    let (report, took) = rig.shutdown().await;
    assert_eq!(report.outcome, ShutdownOutcome::Failed);
    assert_eq!(report.subsystems.outcome, Outcome::Vanished);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

fn fault(subsystem: &str) -> Trigger {
    Trigger::Fault {
        subsystem: subsystem.to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_neighborhood_that_panics_while_running_shuts_the_node_down_by_itself() {
    let node = node(60).await;
    let ends = read_to_end(neighbors(&node, 61..63).await);
    node.crash_neighborhood().await;
    let started = tokio::time::Instant::now();
    let report = within("the node ends by itself", node.wait()).await;
    assert_eq!(report.trigger, fault("neighborhood"), "{}", report.render());
    assert_eq!(report.outcome, ShutdownOutcome::Failed);
    assert_eq!(report.exit_code(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no wait for the deadline"
    );
    assert_eq!(report.subsystems.outcome, Outcome::Done);
    assert_eq!(report.subsystems.children[0].subsystem, "neighborhood");
    assert_eq!(report.subsystems.children[0].outcome, Outcome::Vanished);
    // The pool still closed every stream: the neighbors read to their end.
    for end in ends {
        within("a neighbor reads EOF", end).await.expect("no panic");
    }
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_panics_while_running_shuts_the_node_down_by_itself() {
    let node = node(64).await;
    let _peers = neighbors(&node, 65..67).await;
    node.crash_pool().await;
    let report = within("the node ends by itself", node.wait()).await;
    assert_eq!(report.trigger, fault("stream_handler_pool"));
    assert_eq!(report.outcome, ShutdownOutcome::Failed);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.subsystems.outcome, Outcome::Vanished);
    assert!(report.render().contains("stopped unexpectedly"));
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_panics_during_the_shutdown_ends_it_before_the_deadline() {
    let node = node(68).await;
    // A neighbor that reads nothing more holds the shutdown open.
    let _held = neighbors(&node, 69..70).await;
    node.request_shutdown().await.expect("the gateway takes it");
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.crash_pool().await;
    let started = tokio::time::Instant::now();
    let report = within("the shutdown ends", node.wait()).await;
    assert_eq!(report.trigger, Trigger::Api);
    assert_eq!(report.requests, 1, "the crash is no request");
    assert_eq!(report.outcome, ShutdownOutcome::Failed);
    assert_eq!(report.subsystems.outcome, Outcome::Vanished);
    assert!(
        started.elapsed() < DEFAULT_SHUTDOWN_DEADLINE,
        "{:?}",
        started.elapsed()
    );
}
