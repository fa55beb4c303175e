//! The fault suite: neighbors, UI clients and inputs that misbehave, against real nodes over
//! loopback sockets. No fault may make a node hang, panic, or lose the withdrawal gossip owed to
//! a responsive neighbor. docs/reliability.md lists every case with its test.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshnode::{Config, Node, ShutdownOutcome, ShutdownReport};
use meshnode_protocol::ui::{MAX_UI_MESSAGE_LEN, StatusPayload, UiMessage, codes};
use meshnode_protocol::{Frame, Identity, MAX_FRAME_LEN, NodeId, NodeRecord, SignedRecord};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use support::{
    FakePeer, Websocket, eventually, framed, is_withdrawal_of, lists, status, websocket, within,
};

/// Strikes a neighbor may collect before it is cut off (`stream_handler_pool::MAX_STRIKES`).
const MAX_STRIKES: usize = meshnode::stream_handler_pool::MAX_STRIKES as usize;

async fn node_with(seed: u8, deadline: Duration) -> Node {
    let mut config = Config::new(Identity::from_seed([seed; 32]));
    config.shutdown_deadline = deadline;
    // The neighbors here are played by hand and send no keepalives; these tests are not about
    // liveness (tests/liveness.rs is).
    config.neighbor_timeout = Duration::from_secs(300);
    support::start(config).await
}

/// A peer that has connected and been admitted.
async fn peer(node: &Node, seed: u8) -> FakePeer {
    let peer = FakePeer::connect(node.listen_addr(), Identity::from_seed([seed; 32])).await;
    let id = peer.id();
    eventually("the peer is admitted", || lists(node, id)).await;
    peer
}

/// What a well-behaved neighbor saw of a node's shutdown: every frame up to its end of stream.
struct Witness {
    frames: Vec<Frame>,
}

/// Reads `peer`'s stream to its end in a task of its own.
fn witness(mut peer: FakePeer) -> tokio::task::JoinHandle<Witness> {
    tokio::spawn(async move {
        let frames = peer.rest().await;
        Witness { frames }
    })
}

/// Asserts that the node's withdrawal reached a witness, then its end of stream.
async fn withdrawal_reached(what: &str, node: NodeId, seen: tokio::task::JoinHandle<Witness>) {
    let seen = within(what, seen).await.expect("no panic");
    assert!(
        seen.frames.iter().any(|f| is_withdrawal_of(f, node)),
        "{what}: no withdrawal in {} frames",
        seen.frames.len()
    );
}

/// Version `version` of a record of `owner` that lists `via` and 2000 made-up neighbors: about
/// 135 KB on the wire. Each version replaces the last in the database, but each is gossiped
/// (once `via` lists `owner` back, so that it is reachable).
fn big_record(owner: &Identity, version: u64, via: NodeId) -> SignedRecord {
    let neighbors: BTreeSet<NodeId> = (0..2_000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            NodeId(id)
        })
        .chain([via])
        .collect();
    owner.sign(NodeRecord {
        id: owner.id(),
        addr: "127.0.0.1:9".into(),
        version,
        neighbors,
    })
}

/// A fresh node's record, for checking that news still flows.
fn news(seed: u8) -> SignedRecord {
    news_via(seed, &[])
}

/// A fresh node's record listing `neighbors`.
fn news_via(seed: u8, neighbors: &[NodeId]) -> SignedRecord {
    let owner = Identity::from_seed([seed; 32]);
    owner.sign(NodeRecord {
        id: owner.id(),
        addr: "127.0.0.1:9".into(),
        version: 1,
        neighbors: neighbors.iter().copied().collect(),
    })
}

/// `peer`'s own record at `version`, listing `node` and `others`: a full neighbor that lists
/// `others`, whose records listing it back are then reachable (only reachable records are
/// forwarded). Returns once the node stores it.
async fn lists_back(node: &Node, peer: &mut FakePeer, version: u64, others: &[NodeId]) {
    let record = peer.identity.sign(NodeRecord {
        id: peer.id(),
        addr: "127.0.0.1:9".into(),
        version,
        neighbors: others.iter().copied().chain([node.id()]).collect(),
    });
    peer.send(&Frame::Gossip {
        records: vec![record],
    })
    .await;
    let id = peer.id().to_string();
    eventually("the node stores the record listing it back", || async {
        status(node)
            .await
            .known_nodes
            .iter()
            .any(|k| k.node_id == id && k.version == version)
    })
    .await;
}

/// Asserts the node still serves its neighbors: news from `from` reaches `to`. The news is a
/// new node joining `from` (whose record, at version 1000 + `seed`, lists it), so it is
/// reachable and forwarded.
async fn news_flows(node: &Node, from: &mut FakePeer, to: &mut FakePeer, seed: u8) {
    let record = news_via(seed, &[from.id()]);
    let id = record.id();
    let joined = from.identity.sign(NodeRecord {
        id: from.id(),
        addr: "127.0.0.1:9".into(),
        version: 1000 + u64::from(seed),
        neighbors: [id, node.id()].into_iter().collect(),
    });
    from.send(&Frame::Gossip {
        records: vec![joined, record],
    })
    .await;
    within(
        "news reaches the other neighbor",
        to.until_record(id, |_| true),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Neighbors that misbehave around the shutdown.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbor_whose_receive_buffer_is_full_is_named_and_the_others_still_get_their_withdrawal()
 {
    let deadline = Duration::from_secs(2);
    let node = node_with(1, deadline).await;
    // The stuck neighbor: a tiny receive buffer, and it never reads.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = within("connect", socket.connect(node.listen_addr()))
        .await
        .expect("connects");
    let stuck = support::stuck_neighbor_over(stream).await;
    eventually("the stuck neighbor is admitted", || lists(&node, stuck.id)).await;
    let mut feeder = peer(&node, 2).await;
    let owner = Identity::from_seed([5; 32]);
    lists_back(&node, &mut feeder, 2, &[owner.id()]).await;
    let (good_a, good_b) = (peer(&node, 3).await, peer(&node, 4).await);
    let (seen_a, seen_b) = (witness(good_a), witness(good_b));

    // Big records until the node has to hold gossip back for the stuck neighbor: by then its
    // receive buffer and the node's send buffer to it are full, and its queue is busy.
    let mut version = 0;
    while status(&node).await.stats.gossip_deferred == 0 {
        assert!(version < 400, "the stuck neighbor's buffers never filled");
        version += 1;
        let records = vec![big_record(&owner, version, feeder.id())];
        feeder.send(&Frame::Gossip { records }).await;
    }
    drop(feeder.into_parts());

    let report = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::DeadlineExpired,
        "{}",
        report.render()
    );
    let stuck_stream = format!("stream to {}", stuck.id.short());
    assert!(
        report
            .still_running
            .iter()
            .any(|s| s.starts_with(&stuck_stream)),
        "the report names {stuck_stream}: {:?}",
        report.still_running
    );
    // The others got their withdrawal, then their end of stream, though the stuck neighbor's
    // writer was blocked. (Whether they hung up before the deadline depends on when these
    // witnesses got to run, which a loaded machine decides; in paused time,
    // `shutdown_tests::a_neighbor_that_never_hangs_up_is_named_and_the_rest_of_the_report_survives`
    // pins that only the stuck stream is named.)
    for (what, seen) in [("neighbor A", seen_a), ("neighbor B", seen_b)] {
        withdrawal_reached(what, node.id(), seen).await;
    }
    let ended = within("the node ends", node.wait()).await;
    assert_eq!(ended, report);
}

#[tokio::test]
async fn neighbors_that_reset_during_the_shutdown_change_nothing_for_the_others() {
    let node = node_with(10, Duration::from_secs(5)).await;
    let good = peer(&node, 11).await;
    let mut after_withdrawal = peer(&node, 12).await;
    let at_once = peer(&node, 13).await;
    let seen = witness(good);
    let node_id = node.id();
    // This one reads up to the withdrawal, then resets instead of hanging up.
    let resets = tokio::spawn(async move {
        while let Some(frame) = after_withdrawal.next().await {
            if is_withdrawal_of(&frame, node_id) {
                break;
            }
        }
        support::reset(after_withdrawal).await;
    });
    let controller = node.controller();
    let shutdown = tokio::spawn(async move { controller.shutdown().await });
    // This one resets as the shutdown starts, whether or not its withdrawal was written.
    support::reset(at_once).await;
    within("the resetting neighbor", resets)
        .await
        .expect("no panic");

    let report = within("the shutdown", shutdown)
        .await
        .expect("no panic")
        .expect("answered");
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    assert_eq!(report.exit_code(), 0);
    withdrawal_reached("the good neighbor", node_id, seen).await;
    within("the node ends", node.wait()).await;
}

#[tokio::test]
async fn neighbors_connecting_or_reconnecting_during_the_shutdown_are_refused() {
    let node = node_with(20, Duration::from_secs(3)).await;
    // A neighbor that never hangs up holds the shutdown open.
    let stuck = support::stuck_neighbor(node.listen_addr()).await;
    eventually("the stuck neighbor is admitted", || lists(&node, stuck.id)).await;
    let mut leaving = peer(&node, 21).await;
    // Connected and accepted, but its hello comes only once the shutdown is under way.
    let late = within("connect", TcpStream::connect(node.listen_addr()))
        .await
        .expect("connects");
    eventually("the node accepts the late connection", || async {
        status(&node).await.stats.streams_accepted == 3
    })
    .await;

    let controller = node.controller();
    let shutdown = tokio::spawn(async move { controller.shutdown().await });
    // The neighbor gets its withdrawal and end of stream, then tries to come back.
    let frames = leaving.rest().await;
    assert!(frames.iter().any(|f| is_withdrawal_of(f, node.id())));
    drop(leaving);
    let again = TcpStream::connect(node.listen_addr()).await;
    assert!(again.is_err(), "a reconnect during the shutdown is refused");
    let new = TcpStream::connect(node.listen_addr()).await;
    assert!(new.is_err(), "a new neighbor is refused");
    // The handshake that was in flight is not admitted: the node hangs up.
    let mut late = FakePeer::hello_only(late, Identity::from_seed([22; 32])).await;
    let frames = late.rest().await;
    assert!(
        frames.iter().all(|f| matches!(f, Frame::Hello { .. })),
        "nothing but the node's hello, then the end of stream: {frames:?}"
    );
    assert!(!lists(&node, late.id()).await);

    let report = within("the shutdown", shutdown)
        .await
        .expect("no panic")
        .expect("answered");
    assert_eq!(report.outcome, ShutdownOutcome::DeadlineExpired);
    assert_eq!(report.still_running.len(), 1, "{:?}", report.still_running);
    let streams = report.stats.expect("final counters").streams_accepted;
    assert_eq!(streams, 3, "no stream was admitted during the shutdown");
    within("the node ends", node.wait()).await;
}

// ---------------------------------------------------------------------------------------------
// Malformed frames and forged records.
// ---------------------------------------------------------------------------------------------

/// One kind of bad input: the bytes to send, and the counter it must show up in.
struct BadInput {
    what: &'static str,
    wire: Vec<u8>,
    counter: fn(&meshnode_protocol::ui::Stats) -> u64,
}

fn malformed(s: &meshnode_protocol::ui::Stats) -> u64 {
    s.frames_malformed
}

fn bad_inputs(mallory: &Identity) -> Vec<BadInput> {
    let victim = Identity::from_seed([99; 32]);
    let gossip = |record: SignedRecord| {
        Frame::Gossip {
            records: vec![record],
        }
        .encode()
        .expect("encodes")
    };
    let mut tampered = mallory.sign(NodeRecord {
        id: mallory.id(),
        addr: "127.0.0.1:9".into(),
        version: 2,
        neighbors: BTreeSet::new(),
    });
    tampered.record.version = 50;
    let mut for_another = mallory.sign(NodeRecord {
        id: mallory.id(),
        addr: "127.0.0.1:6666".into(),
        version: 9,
        neighbors: BTreeSet::new(),
    });
    for_another.record.id = victim.id();
    let valid = gossip(news(97)).to_vec();
    let mut overcounted = valid.clone();
    overcounted[1..5].copy_from_slice(&2u32.to_be_bytes());
    // Two neighbors in descending order: the record's neighbor count is the 4 bytes after its
    // id, version, addr length and addr; the neighbors follow it.
    let two = mallory.sign(NodeRecord {
        id: mallory.id(),
        addr: "127.0.0.1:9".into(),
        version: 3,
        neighbors: BTreeSet::from([victim.id(), Identity::from_seed([96; 32]).id()]),
    });
    let mut unordered = gossip(two).to_vec();
    let first = 5 + 32 + 8 + 4 + "127.0.0.1:9".len() + 4;
    let (a, b) = (first, first + 32);
    let mut swapped = unordered[a..b + 32].to_vec();
    swapped.rotate_left(32);
    unordered[a..b + 32].copy_from_slice(&swapped);
    vec![
        BadInput {
            what: "a zero length prefix",
            wire: 0u32.to_be_bytes().to_vec(),
            counter: malformed,
        },
        BadInput {
            what: "an invalid body (a gossip frame cut inside its record)",
            wire: framed(&valid[..valid.len() - 1]),
            counter: malformed,
        },
        BadInput {
            what: "a body of the wrong shape (a record count the bytes cannot hold)",
            wire: framed(&overcounted),
            counter: malformed,
        },
        BadInput {
            what: "a record with its neighbors out of order",
            wire: framed(&unordered),
            counter: malformed,
        },
        BadInput {
            what: "an unknown frame type",
            wire: framed(&[0x7f, 1, 2, 3]),
            counter: malformed,
        },
        BadInput {
            what: "a hello out of turn",
            wire: framed(&Frame::Hello { record: news(98) }.encode().expect("encodes")),
            counter: malformed,
        },
        BadInput {
            what: "a frame over the size limit",
            wire: framed(&vec![b' '; MAX_FRAME_LEN + 1]),
            counter: |s| s.frames_oversized,
        },
        BadInput {
            what: "a record tampered with after signing",
            wire: framed(&gossip(tampered)),
            counter: |s| s.records_rejected,
        },
        BadInput {
            what: "a record for another id, signed with the sender's key",
            wire: framed(&gossip(for_another)),
            counter: |s| s.records_rejected,
        },
    ]
}

#[tokio::test]
async fn bad_frames_and_forged_records_are_dropped_counted_and_a_repeat_offender_is_cut_off() {
    let node = node_with(30, Duration::from_secs(5)).await;
    let mut source = peer(&node, 31).await;
    let mut sink = peer(&node, 32).await;
    let mallory_id = Identity::from_seed([33; 32]);
    for (n, bad) in bad_inputs(&mallory_id).into_iter().enumerate() {
        let mut mallory = peer(&node, 33).await;
        let before = status(&node).await;
        let known_before = before.known_nodes.len();
        // Once: dropped, counted, and the stream carries on.
        mallory.try_send_raw(&bad.wire).await.expect("sent");
        eventually(&format!("{} is counted", bad.what), || async {
            (bad.counter)(&status(&node).await.stats) == (bad.counter)(&before.stats) + 1
        })
        .await;
        assert!(
            lists(&node, mallory.id()).await,
            "{}: one is tolerated",
            bad.what
        );
        news_flows(&node, &mut source, &mut sink, 100 + n as u8).await;
        // Again and again: the repeat offender is disconnected.
        for _ in 1..MAX_STRIKES {
            if mallory.try_send_raw(&bad.wire).await.is_err() {
                break;
            }
        }
        while mallory.next().await.is_some() {}
        let after = status(&node).await;
        assert_eq!(
            after.stats.peers_disconnected_for_abuse,
            before.stats.peers_disconnected_for_abuse + 1,
            "{}",
            bad.what
        );
        assert_eq!(
            (bad.counter)(&after.stats),
            (bad.counter)(&before.stats) + MAX_STRIKES as u64,
            "{}",
            bad.what
        );
        // Nothing it sent changed the database beyond the news.
        assert_eq!(after.known_nodes.len(), known_before + 1, "{}", bad.what);
        eventually("mallory is gone", || async {
            !lists(&node, mallory.id()).await
        })
        .await;
        // Every other neighbor is served as before.
        assert!(lists(&node, source.id()).await && lists(&node, sink.id()).await);
    }
    assert!(node.stop().await);
}

#[tokio::test]
async fn a_truncated_frame_is_counted_and_ends_only_that_stream() {
    let node = node_with(40, Duration::from_secs(5)).await;
    let mut source = peer(&node, 41).await;
    let mut sink = peer(&node, 42).await;
    let mut mallory = peer(&node, 43).await;
    let before = status(&node).await.stats.frames_malformed;
    let whole = framed(
        &Frame::Gossip {
            records: vec![news(45)],
        }
        .encode()
        .expect("encodes"),
    );
    mallory
        .try_send_raw(&whole[..whole.len() / 2])
        .await
        .expect("sent");
    mallory.finish().await;
    while mallory.next().await.is_some() {}
    eventually("the truncated frame is counted", || async {
        status(&node).await.stats.frames_malformed == before + 1
    })
    .await;
    news_flows(&node, &mut source, &mut sink, 44).await;
    assert!(node.stop().await);
}

#[tokio::test]
async fn replays_and_a_flood_of_useless_gossip_are_counted_and_the_flooder_is_cut_off() {
    let node = node_with(50, Duration::from_secs(5)).await;
    let mut source = peer(&node, 51).await;
    let mut sink = peer(&node, 52).await;
    let mut mallory = peer(&node, 53).await;
    let victim = news(54);
    let victim_owner = Identity::from_seed([54; 32]);
    // The victim joins the source: reachable, so its records are forwarded.
    lists_back(&node, &mut source, 2, &[victim.id()]).await;
    let newer = victim_owner.sign(NodeRecord {
        version: 2,
        neighbors: [source.id()].into_iter().collect(),
        ..victim.record.clone()
    });
    source
        .send(&Frame::Gossip {
            records: vec![newer.clone()],
        })
        .await;
    within(
        "the newer record spreads",
        sink.until_record(victim.id(), |r| r.version == 2),
    )
    .await;

    // A replay of a lower version: dropped, counted as stale, and the stored version stays.
    let before = status(&node).await.stats;
    mallory
        .send(&Frame::Gossip {
            records: vec![victim.clone()],
        })
        .await;
    eventually("the replay is counted", || async {
        status(&node).await.stats.records_stale > before.records_stale
    })
    .await;
    let stored = status(&node).await;
    let stored = stored
        .known_nodes
        .iter()
        .find(|k| k.node_id == victim.id().to_string())
        .expect("the victim is known");
    assert_eq!(stored.version, 2, "versions never go back");

    // The same valid record, over and over: counted, then cut off.
    let flood = framed(
        &Frame::Gossip {
            records: vec![newer],
        }
        .encode()
        .expect("encodes"),
    );
    let mut sent = 0;
    while sent < 50_000 && mallory.try_send_raw(&flood).await.is_ok() {
        sent += 1;
    }
    while mallory.next().await.is_some() {}
    let after = status(&node).await.stats;
    assert!(
        after.gossip_frames_useless >= 1_024,
        "{}",
        after.gossip_frames_useless
    );
    assert_eq!(
        after.peers_disconnected_for_abuse,
        before.peers_disconnected_for_abuse + 1
    );
    eventually("the flooder is gone", || async {
        !lists(&node, mallory.id()).await
    })
    .await;
    news_flows(&node, &mut source, &mut sink, 55).await;
    assert!(node.stop().await);
}

// ---------------------------------------------------------------------------------------------
// UI clients that misbehave.
// ---------------------------------------------------------------------------------------------

async fn ask(socket: &mut Websocket, opcode: &str, context_id: u64) -> UiMessage {
    let request = json!({"opcode": opcode, "contextId": context_id, "payload": {}});
    within("send", socket.send(Message::text(request.to_string())))
        .await
        .expect("sent");
    answer(socket).await.expect("an answer")
}

/// The next text message, or what ended the connection.
async fn answer(socket: &mut Websocket) -> Result<UiMessage, String> {
    loop {
        match within("an answer", socket.next()).await {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).expect("a MASQ envelope"));
            }
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("failed: {e}")),
            None => return Err("ended".into()),
        }
    }
}

#[tokio::test]
async fn a_ui_message_over_the_limit_gets_an_error_and_a_close_and_others_carry_on() {
    let node = node_with(60, Duration::from_secs(5)).await;
    let mut bystander = websocket(node.ui_addr()).await;
    let mut big = websocket(node.ui_addr()).await;
    let padding = "x".repeat(MAX_UI_MESSAGE_LEN);
    let huge = json!({"opcode": "status", "contextId": 1, "payload": {"pad": padding}});
    within("send", big.send(Message::text(huge.to_string())))
        .await
        .expect("sent");
    let error = answer(&mut big).await.expect("an error envelope first");
    let error = error.error.expect("an error");
    assert_eq!(error.code, codes::BAD_FRAME, "{}", error.message);
    assert!(error.message.contains(&MAX_UI_MESSAGE_LEN.to_string()));
    let end = answer(&mut big).await.expect_err("then the close");
    assert!(end.contains("1009") || end.contains("Size"), "{end}");

    let status = ask(&mut bystander, "status", 7).await;
    assert_eq!(status.context_id, Some(7));
    assert!(status.payload.is_some());
    assert!(node.stop().await);
}

#[tokio::test]
async fn clients_that_disconnect_mid_request_change_nothing() {
    let node = node_with(70, Duration::from_secs(5)).await;
    let neighbor = peer(&node, 71).await;
    let seen = witness(neighbor);
    let mut bystander = websocket(node.ui_addr()).await;
    // A status request, then gone before the answer.
    for _ in 0..20 {
        let mut socket = websocket(node.ui_addr()).await;
        let request = json!({"opcode": "status", "contextId": 1, "payload": {}});
        socket
            .send(Message::text(request.to_string()))
            .await
            .expect("sent");
        drop(socket);
    }
    // An HTTP status request cut off half way, and a whole one whose client leaves at once.
    let mut half = TcpStream::connect(node.ui_addr()).await.expect("connects");
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /status HTTP/1.1\r\nHo")
        .await
        .expect("sent");
    drop(half);
    let answer = ask(&mut bystander, "status", 2).await;
    assert_eq!(answer.payload.expect("status")["state"], "running");

    // A shutdown request whose client leaves before the answer: the shutdown still runs to
    // its end, gracefully, and the bystander is told.
    let mut leaver = TcpStream::connect(node.ui_addr()).await.expect("connects");
    tokio::io::AsyncWriteExt::write_all(
        &mut leaver,
        b"POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .expect("sent");
    drop(leaver);
    let report: ShutdownReport = within("the node ends", node.wait()).await;
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    assert_eq!(report.requests, 1);
    withdrawal_reached("the neighbor", report.node_id.parse().expect("an id"), seen).await;
}

#[tokio::test]
async fn hundreds_of_ui_clients_at_once_are_all_answered() {
    const CLIENTS: usize = 300;
    let node = node_with(80, Duration::from_secs(5)).await;
    let ui = node.ui_addr();
    let mut asks = Vec::new();
    for i in 0..CLIENTS {
        asks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let response = reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .expect("client")
                    .get(format!("http://{ui}/status"))
                    .send()
                    .await
                    .expect("GET");
                assert!(response.status().is_success());
                let status: StatusPayload = response.json().await.expect("JSON");
                assert_eq!(status.ui, ui.to_string());
            } else {
                let mut socket = websocket(ui).await;
                let answer = ask(&mut socket, "status", i as u64).await;
                assert_eq!(answer.context_id, Some(i as u64));
                assert!(answer.payload.is_some(), "{answer:?}");
                let _ = socket.close(None).await;
            }
        }));
    }
    for ask in asks {
        within("a client", ask).await.expect("answered");
    }
    let report = within("the shutdown", node.shutdown())
        .await
        .expect("answered");
    assert_eq!(report.outcome, ShutdownOutcome::Graceful);
}

#[tokio::test]
async fn a_withdrawal_cannot_be_forged_only_the_departing_nodes_own_record_removes_it() {
    let node = node_with(90, Duration::from_secs(5)).await;
    let mut leaver = peer(&node, 91).await;
    let mut mallory = peer(&node, 92).await;
    let listed_by_node = |status: &StatusPayload, peer: NodeId| {
        let (me, peer) = (status.node_id.clone(), peer.to_string());
        status
            .known_nodes
            .iter()
            .any(|k| k.node_id == me && k.neighbors.contains(&peer))
    };
    // The leaver lists the node back: a full neighborship.
    let full = leaver.identity.sign(NodeRecord {
        version: 2,
        neighbors: [node.id()].into_iter().collect(),
        ..leaver.record_at(2, "127.0.0.1:9").record
    });
    leaver
        .send(&Frame::Gossip {
            records: vec![full.clone()],
        })
        .await;
    eventually("the neighborship is full", || async {
        status(&node)
            .await
            .neighbors
            .iter()
            .any(|n| n.node_id == leaver.id().to_string() && n.full)
    })
    .await;

    // Mallory forges the leaver's withdrawal (a newer record without the node, signed with
    // Mallory's key) and replays the leaver's record from before it listed the node.
    let before = status(&node).await.stats;
    let mut forged = mallory.identity.sign(NodeRecord {
        version: 3,
        ..leaver.record_at(3, "127.0.0.1:9").record
    });
    forged.record.id = leaver.id();
    let old = leaver.record_at(1, "127.0.0.1:9");
    mallory
        .send(&Frame::Gossip {
            records: vec![forged, old],
        })
        .await;
    eventually("both are dropped", || async {
        let s = status(&node).await.stats;
        s.records_rejected == before.records_rejected + 1
            && s.records_stale == before.records_stale + 1
    })
    .await;
    let now = status(&node).await;
    assert!(
        listed_by_node(&now, leaver.id()),
        "a forged withdrawal removed a neighbor"
    );

    // The leaver's own signed withdrawal does remove it, in one round.
    leaver
        .send(&Frame::Gossip {
            records: vec![leaver.record_at(3, "127.0.0.1:9")],
        })
        .await;
    eventually("the real withdrawal is honoured", || async {
        !listed_by_node(&status(&node).await, leaver.id())
    })
    .await;
    // Mallory hears of it: the withdrawal itself, forwarded at once (the node's own record
    // without the leaver waits for its next change of another kind).
    within(
        "mallory hears of the withdrawal",
        mallory.until_record(leaver.id(), |r| r.neighbors.is_empty()),
    )
    .await;
    assert!(node.stop().await);
}
