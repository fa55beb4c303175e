//! Streams run over in-memory `tokio::io::duplex` pipes against a real neighborhood and a real
//! pool task, with the test playing the remote peer frame by frame; and the pool's admission
//! rule driven directly through `Pool::handle`.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use meshnode_protocol::{Frame, Identity, Inbound, MAX_FRAME_LEN, NodeRecord, SignedRecord};
use tokio::io::{AsyncReadExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::link::{LinkCodec, LinkWriter, Negotiated, handshake, next_inbound};
use crate::test_support::test_link;

use super::connection::{self, Ended};
use super::state::Pool;
use super::*;
use crate::test_support::within;

/// Room in each direction of an in-memory stream.
const PIPE: usize = 64 * 1024;
const ADDR: &str = "127.0.0.1:4000";

/// Polls `probe` until it yields a value, letting the other tasks run between tries. Everything
/// here is in memory, so a bounded number of tries is plenty (and time does not move meanwhile).
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    const TRIES: usize = 10_000;
    for _ in 0..TRIES {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: not after {TRIES} tries");
}

fn identity(seed: u8) -> Identity {
    Identity::from_seed([seed; 32])
}

fn signed(owner: &Identity, version: u64) -> SignedRecord {
    owner.sign(NodeRecord {
        id: owner.id(),
        addr: "127.0.0.1:5000".into(),
        version,
        neighbors: BTreeSet::new(),
    })
}

fn summary(records: &[SignedRecord]) -> BTreeSet<(NodeId, u64)> {
    records.iter().map(|r| (r.id(), r.version())).collect()
}

async fn loopback_listener() -> TcpListener {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    within("bind", TcpListener::bind(addr))
        .await
        .expect("a loopback port is free")
}

/// A node's neighborhood and pool, running, with the `Shared` its stream tasks get. The pool's
/// listener is bound but never dialed: streams come in through [`Rig::open`].
struct Rig {
    me: Identity,
    shared: Shared,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Rig {
    async fn start(seed: u8) -> Self {
        let (rig, inbox) = Self::without_pool(seed);
        let listener = loopback_listener().await;
        rig.tracker
            .spawn(Pool::new(rig.shared.clone(), listener).run(inbox));
        rig
    }

    /// A node whose pool is played by the test, through the inbox returned.
    fn without_pool(seed: u8) -> (Self, mpsc::Receiver<PoolMsg>) {
        let me = identity(seed);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let neighborhood = crate::neighborhood::spawn_counting(
            me.clone(),
            ADDR.into(),
            crate::neighborhood::GossipTiming::default(),
            cancel.child_token(),
            &tracker,
        )
        .expect("the node's first record is valid");
        let (tx, rx) = mpsc::channel(POOL_INBOX);
        let pool = PoolHandle { tx };
        let shared = Shared {
            me: me.id(),
            link: Arc::new({
                // The node under test offers what a node offers; played peers offer none.
                let mut link = test_link(me.clone());
                link.features = crate::link::handshake::FEATURES;
                link
            }),
            limits: Limits::from_fd_limit(1 << 20),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            verifiers: super::Verifiers::new(2),
            neighborhood: neighborhood.clone(),
            pool: pool.clone(),
            cancel: cancel.child_token(),
            intake: cancel.child_token(),
            tracker: tracker.clone(),
            counters: Arc::default(),
            next_conn: Arc::new(AtomicU64::new(1)),
            verified: Arc::new(meshnode_protocol::VerifyCache::new(64)),
        };
        let rig = Self {
            me,
            shared,
            neighborhood,
            pool,
            cancel,
            tracker,
        };
        (rig, rx)
    }

    /// A new stream from the remote peer `seed`, run by the node as `connection::run` would be
    /// by the pool (`dialed` false) or by a dialer (`dialed` true).
    fn open(&self, seed: u8, dialed: bool) -> Remote {
        let (node_end, remote_end) = tokio::io::duplex(PIPE);
        let ended = tokio::spawn(connection::run(self.shared.clone(), node_end, dialed, None));
        Remote {
            identity: identity(seed),
            raw: Some(tokio::io::split(remote_end)),
            link: None,
            node_dialed: dialed,
            versions: crate::link::handshake::VERSIONS,
            features: 0,
            ended,
        }
    }

    async fn counters(&self) -> PoolCounters {
        within("the pool answers", self.pool.counters())
            .await
            .expect("the pool is running")
    }

    async fn status(&self) -> crate::neighborhood::NeighborhoodStatus {
        within("the neighborhood answers", self.neighborhood.status())
            .await
            .expect("the neighborhood is running")
    }

    async fn neighbors(&self) -> BTreeSet<NodeId> {
        self.status()
            .await
            .neighbors
            .iter()
            .map(|n| n.node_id.parse().expect("neighbor ids are hex"))
            .collect()
    }

    async fn knows(&self, id: NodeId) -> bool {
        let id = id.to_string();
        self.status()
            .await
            .known_nodes
            .iter()
            .any(|k| k.node_id == id)
    }

    /// Stops the node and checks that every task of it ends.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        within("the node's tasks end", self.tracker.wait()).await;
    }
}

/// The remote peer's reader and writer once the link is up.
type RemoteLink = (
    FramedRead<ReadHalf<DuplexStream>, LinkCodec>,
    LinkWriter<WriteHalf<DuplexStream>>,
);

/// The remote peer's end of one stream, and the node's stream task for it.
struct Remote {
    identity: Identity,
    /// The stream before the link handshake.
    raw: Option<(ReadHalf<DuplexStream>, WriteHalf<DuplexStream>)>,
    /// The encrypted link after it.
    link: Option<RemoteLink>,
    /// Whether the node dialed (and so starts the handshake).
    node_dialed: bool,
    /// The protocol versions this peer offers.
    versions: (u16, u16),
    /// The feature bits this peer offers (none unless a test sets them).
    features: u32,
    ended: JoinHandle<Ended>,
}

impl Remote {
    fn id(&self) -> NodeId {
        self.identity.id()
    }

    fn hello(&self) -> Frame {
        Frame::Hello {
            record: signed(&self.identity, 1),
        }
    }

    fn writer(&mut self) -> &mut LinkWriter<WriteHalf<DuplexStream>> {
        &mut self.link.as_mut().expect("the link is up").1
    }

    async fn send(&mut self, frame: &Frame) {
        self.send_body(frame.encode().expect("the test's frames encode"))
            .await;
    }

    async fn send_body(&mut self, body: Bytes) {
        within("the node takes a frame", self.writer().send_frame(&body))
            .await
            .expect("the stream is open");
    }

    /// A length prefix over `MAX_FRAME_LEN`, then (if `body`) that many bytes.
    async fn send_oversized(&mut self, body: bool) {
        let len = MAX_FRAME_LEN + 1;
        let mut wire = Vec::with_capacity(4 + len);
        wire.extend_from_slice(&u32::try_from(len).expect("fits").to_be_bytes());
        if body {
            wire.resize(4 + len, b'x');
        }
        within(
            "the node skips an oversized frame",
            self.writer().send_raw(&wire),
        )
        .await
        .expect("the stream is open");
    }

    /// The next frame from the node, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<Frame> {
        let reader = &mut self.link.as_mut().expect("the link is up").0;
        match within("a frame or the end of the stream", next_inbound(reader)).await {
            None => None,
            Some(Ok(Inbound::Frame(body))) => {
                Some(Frame::decode(&body).expect("the node sends valid frames"))
            }
            other => panic!("the node sent {other:?}"),
        }
    }

    /// Bytes the node sends before the end of the stream, before any handshake.
    async fn raw_rest(&mut self) -> usize {
        let (read, _) = self.raw.as_mut().expect("no handshake yet");
        let mut bytes = Vec::new();
        within("the end of the stream", read.read_to_end(&mut bytes))
            .await
            .expect("reads");
        bytes.len()
    }

    /// The link handshake alone, as the side that did not dial.
    async fn link_up(&mut self) -> Negotiated {
        let (read, write) = self.raw.take().expect("one handshake per stream");
        let mut local = test_link(self.identity.clone());
        local.versions = self.versions;
        local.features = self.features;
        let (link, reader, writer) = within(
            "the link handshake",
            handshake(read, write, !self.node_dialed, &local),
        )
        .await
        .expect("the link handshake succeeds");
        self.link = Some((reader, writer));
        link
    }

    async fn next_gossip(&mut self) -> Vec<SignedRecord> {
        match self.next().await {
            Some(Frame::Gossip { records }) => records,
            other => panic!("gossip expected, got {other:?}"),
        }
    }

    /// Every frame up to the end of the stream.
    async fn rest(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            frames.push(frame);
        }
        frames
    }

    /// Runs the link handshake, sends this peer's record and checks the node's, which it
    /// returns.
    async fn handshake(&mut self, node: &Identity) -> SignedRecord {
        let link = self.link_up().await;
        assert_eq!(link.peer, node.id());
        let hello = self.hello();
        self.send(&hello).await;
        match self.next().await {
            Some(Frame::Hello { record }) => {
                assert_eq!(record.id(), node.id());
                record.verify().expect("the node's hello verifies");
                record
            }
            other => panic!("hello expected, got {other:?}"),
        }
    }

    /// How the node's stream task ended.
    async fn ended(&mut self) -> Ended {
        within("the stream task ends", &mut self.ended)
            .await
            .expect("the stream task does not panic")
    }
}

#[tokio::test(start_paused = true)]
async fn a_good_hello_is_answered_admitted_and_followed_by_the_database() {
    let rig = Rig::start(1).await;
    let me = rig.me.id();
    let mut a = rig.open(10, false);

    let hello = a.handshake(&rig.me).await;
    assert_eq!(hello.version(), 1, "the record from before A connected");
    let gossip = a.next_gossip().await;
    assert_eq!(summary(&gossip), BTreeSet::from([(me, 2), (a.id(), 1)]));
    let own = gossip
        .iter()
        .find(|r| r.id() == me)
        .expect("the node's record");
    assert_eq!(own.record.neighbors, BTreeSet::from([a.id()]));

    assert_eq!(rig.neighbors().await, BTreeSet::from([a.id()]));
    assert!(rig.knows(a.id()).await);
    assert_eq!(rig.counters().await.streams_open, 1);

    // What the peer gossips reaches the neighborhood.
    let x = identity(20);
    a.send(&Frame::Gossip {
        records: vec![signed(&x, 1)],
    })
    .await;
    until("X is known", || async {
        rig.knows(x.id()).await.then_some(())
    })
    .await;

    rig.stop().await;
    assert_eq!(a.ended().await, Ended::Cancelled);
    assert!(a.rest().await.is_empty(), "the stream closes with the node");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stalls_the_handshake_or_its_first_frame_is_dropped_at_the_timeout() {
    let rig = Rig::start(1).await;

    // Connects and says nothing: the node, which did not dial, waits for the first message.
    let mut silent = rig.open(10, false);
    let started = Instant::now();
    let ended = silent.ended().await;
    assert!(
        matches!(&ended, Ended::NotAdmitted(reason) if reason.contains("timeout")),
        "{ended:?}"
    );
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
    assert_eq!(silent.raw_rest().await, 0, "nothing is sent before a proof");

    // Proves its id but never sends its record.
    let mut mute = rig.open(11, false);
    let started = Instant::now();
    mute.link_up().await;
    match mute.next().await {
        Some(Frame::Hello { .. }) => {}
        other => panic!("the node's record expected, got {other:?}"),
    }
    let ended = mute.ended().await;
    assert!(
        matches!(&ended, Ended::NotAdmitted(reason) if reason.contains("timeout")),
        "{ended:?}"
    );
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
    assert!(mute.rest().await.is_empty());
    assert!(rig.neighbors().await.is_empty());
    assert_eq!(rig.counters().await.handshakes_failed, 2);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_first_frame_after_the_proof_is_refused_and_nothing_reaches_the_neighborhood() {
    let rig = Rig::start(1).await;
    let peer = identity(10);
    let forged = identity(66).sign(NodeRecord {
        id: peer.id(),
        addr: "127.0.0.1:5000".into(),
        version: 1,
        neighbors: BTreeSet::new(),
    });
    let encode = |frame: Frame| frame.encode().expect("encodes");
    let good = encode(Frame::Hello {
        record: signed(&peer, 1),
    });
    let mut trailing = good.to_vec();
    trailing.push(0);
    let cases = [
        (
            "a forged signature",
            encode(Frame::Hello { record: forged }),
            "does not verify",
        ),
        (
            "a hello cut short",
            good.slice(..good.len() - 1),
            "malformed",
        ),
        (
            "a hello with a byte after its record",
            Bytes::from(trailing),
            "malformed",
        ),
        (
            "gossip first",
            encode(Frame::Gossip {
                records: vec![signed(&peer, 1)],
            }),
            "another frame type",
        ),
        (
            "the record of another node than the one proven (here the node's own)",
            encode(Frame::Hello {
                record: signed(&rig.me, 9),
            }),
            "another node",
        ),
        (
            "a version 2 (JSON) hello",
            Bytes::from_static(br#"{"type":"hello","protocol":2,"record":{}}"#),
            "malformed",
        ),
    ];
    let total = cases.len() + 1;
    for (what, body, why) in cases {
        let mut remote = rig.open(10, false);
        remote.link_up().await;
        remote.send_body(body).await;
        let ended = remote.ended().await;
        assert!(
            matches!(&ended, Ended::NotAdmitted(reason) if reason.contains(why)),
            "{what}: {ended:?}"
        );
        let frames = remote.rest().await;
        assert!(
            frames.iter().all(|f| matches!(f, Frame::Hello { .. })),
            "{what}: only the node's record may arrive, got {frames:?}"
        );
    }

    // An oversized first frame is refused on its length alone.
    let mut remote = rig.open(10, false);
    remote.link_up().await;
    remote.send_oversized(false).await;
    let ended = remote.ended().await;
    assert!(
        matches!(&ended, Ended::NotAdmitted(reason) if reason.contains("oversized")),
        "{ended:?}"
    );

    let status = rig.status().await;
    assert_eq!(status.version, 1);
    assert!(status.neighbors.is_empty());
    assert_eq!(status.known_nodes.len(), 1, "only the node's own record");
    assert_eq!(status.counters, Default::default());
    let counters = rig.counters().await;
    assert_eq!(counters.streams_open, 0);
    assert_eq!(
        counters.frames_malformed, 0,
        "a refused first frame is not a strike"
    );
    assert_eq!(counters.handshakes_refused, total as u64);
    rig.stop().await;
}

// In real time: the check runs on a blocking thread, which paused time would not wait for.
#[tokio::test]
async fn a_large_frame_is_verified_off_the_runtime_and_still_sorts_good_records_from_forged() {
    let rig = Rig::start(1).await;
    let mut a = rig.open(10, false);
    a.handshake(&rig.me).await;
    a.next_gossip().await;
    // Far more records than are checked inline; one of them forged.
    let owners: Vec<Identity> = (100..164).map(identity).collect();
    let mut records: Vec<SignedRecord> = owners.iter().map(|o| signed(o, 1)).collect();
    records[17].record.version = 2;
    a.send(&Frame::Gossip { records }).await;
    let good: Vec<NodeId> = owners
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 17)
        .map(|(_, o)| o.id())
        .collect();
    let stored = within("the frame is checked and its good records stored", async {
        loop {
            let status = rig.status().await;
            let known: BTreeSet<String> = status
                .known_nodes
                .iter()
                .map(|k| k.node_id.clone())
                .collect();
            if rig.counters().await.records_rejected == 1
                && good.iter().all(|id| known.contains(&id.to_string()))
            {
                break known;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        !stored.contains(&owners[17].id().to_string()),
        "the forged record is not stored"
    );
    assert_eq!(rig.counters().await.records_rejected, 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_frame_type_is_skipped_from_a_newer_peer_and_a_strike_from_any_other() {
    let rig = Rig::start(1).await;
    let unknown = Bytes::from_static(br#"{"type":"sketch","of":[1,2,3]}"#);
    let high = crate::link::handshake::VERSIONS.1;

    // A peer that also speaks the next version: its new frames are none of this node's
    // business, however many.
    let mut newer = rig.open(10, false);
    newer.versions = (high, high + 1);
    newer.handshake(&rig.me).await;
    newer.next_gossip().await;
    for _ in 0..MAX_STRIKES {
        newer.send_body(unknown.clone()).await;
    }
    let counters = until("the unknown frames are counted", || async {
        let c = rig.counters().await;
        (c.frames_unknown == u64::from(MAX_STRIKES)).then_some(c)
    })
    .await;
    assert_eq!(counters.frames_malformed, 0);
    assert_eq!(counters.peers_disconnected_for_abuse, 0);
    assert_eq!(rig.neighbors().await, BTreeSet::from([newer.id()]));

    // A peer of this node's version has no business sending one: a bad frame.
    let mut same = rig.open(11, false);
    same.handshake(&rig.me).await;
    same.send_body(unknown).await;
    let counters = until("the bad frame is counted", || async {
        let c = rig.counters().await;
        (c.frames_malformed == 1).then_some(c)
    })
    .await;
    assert_eq!(counters.frames_unknown, u64::from(MAX_STRIKES));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_digest_is_answered_on_a_link_with_the_feature_and_a_bad_frame_on_one_without() {
    use crate::link::handshake::FEATURE_DIGEST;
    use meshnode_protocol::Digest;
    let rig = Rig::start(1).await;
    let lacking_everything = Frame::Digest(Digest {
        start: NodeId([0; 32]),
        complete: true,
        entries: Vec::new(),
    });

    // A peer that settled on digests: its digest that lacks the node's record is answered
    // with it, once that record is no longer on its way by gossip.
    let mut speaks = rig.open(10, false);
    speaks.features = FEATURE_DIGEST;
    let link = speaks.link_up().await;
    assert_eq!(link.features, FEATURE_DIGEST);
    let hello = speaks.hello();
    speaks.send(&hello).await;
    assert!(matches!(speaks.next().await, Some(Frame::Hello { .. })));
    speaks.next_gossip().await;
    tokio::time::sleep(crate::neighborhood::REPAIR_AGE * 2).await;
    speaks.send(&lacking_everything).await;
    let repaired = loop {
        match speaks.next().await {
            Some(Frame::Gossip { records }) => break records,
            // The node's own digests: it too speaks the feature.
            Some(Frame::Digest(_)) => continue,
            other => panic!("gossip expected, got {other:?}"),
        }
    };
    assert!(
        repaired.iter().any(|r| r.id() == rig.me.id()),
        "{repaired:?}"
    );
    assert!(
        repaired.iter().all(|r| r.id() != speaks.id()),
        "its own it sent"
    );
    assert_eq!(rig.counters().await.frames_malformed, 0);

    // A peer of the same version that did not settle on them has no business sending one.
    let mut other = rig.open(11, false);
    other.handshake(&rig.me).await;
    other.send(&lacking_everything).await;
    until("the bad frame is counted", || async {
        (rig.counters().await.frames_malformed == 1).then_some(())
    })
    .await;
    assert_eq!(rig.counters().await.frames_unknown, 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_frames_are_counted_and_tolerated_until_max_strikes_then_the_peer_is_cut_off() {
    let rig = Rig::start(1).await;
    let mut a = rig.open(10, false);
    a.handshake(&rig.me).await;
    a.next_gossip().await;

    // Four strikes, one of each kind; the good record beside the forged one still counts.
    let (x, y) = (identity(20), identity(21));
    let mut forged = signed(&y, 1);
    forged.record.version = 2;
    // A gossip frame that claims a record it does not hold.
    a.send_body(Bytes::from_static(&[2, 0, 0, 0, 1, 7, 7, 7]))
        .await;
    let hello = a.hello();
    a.send(&hello).await;
    a.send_oversized(true).await;
    a.send(&Frame::Gossip {
        records: vec![forged, signed(&x, 1)],
    })
    .await;
    let counters = until("the four bad frames are counted", || async {
        let c = rig.counters().await;
        (c.records_rejected == 1).then_some(c)
    })
    .await;
    assert_eq!(
        counters,
        PoolCounters {
            frames_malformed: 2,
            frames_oversized: 1,
            records_rejected: 1,
            streams_open: 1,
            // The one admitted stream: A's, which A dialed.
            admitted: vec![(a.id(), false)],
            ..PoolCounters::default()
        }
    );
    until("X is known", || async {
        rig.knows(x.id()).await.then_some(())
    })
    .await;
    assert!(!rig.knows(y.id()).await, "a forged record is never stored");

    // Up to one strike short of the limit the stream lives on, as a good frame after them shows.
    for _ in 4..MAX_STRIKES - 1 {
        a.send_body(Bytes::new()).await;
    }
    let z = identity(22);
    a.send(&Frame::Gossip {
        records: vec![signed(&z, 1)],
    })
    .await;
    until("Z is known", || async {
        rig.knows(z.id()).await.then_some(())
    })
    .await;
    let counters = rig.counters().await;
    assert_eq!(counters.frames_malformed, 2 + u64::from(MAX_STRIKES - 5));
    assert_eq!(counters.peers_disconnected_for_abuse, 0);
    assert_eq!(rig.neighbors().await, BTreeSet::from([a.id()]));

    // One more is one too many.
    a.send_body(Bytes::from_static(&[2, 0, 0])).await;
    assert_eq!(a.ended().await, Ended::Closed(a.id()));
    assert!(a.rest().await.is_empty(), "the node closes the stream");
    let counters = rig.counters().await;
    assert_eq!(counters.peers_disconnected_for_abuse, 1);
    assert_eq!(counters.streams_open, 0);
    assert!(rig.neighbors().await.is_empty());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn end_of_stream_from_the_peer_drops_the_half_neighborship() {
    let rig = Rig::start(1).await;
    let me = rig.me.id();
    let mut a = rig.open(10, false);
    a.handshake(&rig.me).await;
    a.next_gossip().await;
    let mut b = rig.open(11, false);
    b.handshake(&rig.me).await;
    assert_eq!(
        summary(&b.next_gossip().await),
        BTreeSet::from([(me, 3), (a.id(), 1), (b.id(), 1)])
    );
    assert_eq!(rig.counters().await.streams_open, 2);

    within("A shuts its side", a.writer().shutdown())
        .await
        .expect("the stream is open");
    assert_eq!(a.ended().await, Ended::Closed(a.id()));
    // The stream task told the neighborhood before it ended.
    assert_eq!(rig.neighbors().await, BTreeSet::from([b.id()]));
    let gossip = b.next_gossip().await;
    assert_eq!(summary(&gossip), BTreeSet::from([(me, 4)]));
    assert_eq!(gossip[0].record.neighbors, BTreeSet::from([b.id()]));
    assert_eq!(rig.counters().await.streams_open, 1);

    rig.stop().await;
    assert_eq!(b.ended().await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_second_stream_to_a_neighbor_replaces_or_yields_to_the_first_by_the_dialing_rule() {
    let rig = Rig::start(1).await;
    let peer = identity(10).id();
    // This node keeps the stream dialed by the smaller id of the two.
    let preferred = rig.me.id() < peer;

    let mut first = rig.open(10, !preferred);
    first.handshake(&rig.me).await;
    first.next_gossip().await;

    // The preferred direction replaces it: the first is closed by this node.
    let mut second = rig.open(10, preferred);
    second.handshake(&rig.me).await;
    assert_eq!(first.ended().await, Ended::Closed(peer));
    assert!(
        second
            .next_gossip()
            .await
            .iter()
            .any(|r| r.id() == rig.me.id()),
        "the new stream gets the database"
    );
    assert_eq!(rig.neighbors().await, BTreeSet::from([peer]));

    // Another stream from the other direction yields to the kept one.
    let mut third = rig.open(10, !preferred);
    third.handshake(&rig.me).await;
    assert_eq!(third.ended().await, Ended::Duplicate(peer));
    assert!(third.rest().await.is_empty());
    assert_eq!(rig.neighbors().await, BTreeSet::from([peer]));
    assert_eq!(rig.counters().await.streams_open, 1);

    rig.stop().await;
    assert_eq!(second.ended().await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_peer_back_from_a_restart_is_sent_the_record_of_its_earlier_life() {
    let rig = Rig::start(1).await;
    let mut a = rig.open(10, false);
    a.handshake(&rig.me).await;
    a.next_gossip().await;
    // A's record in its earlier run, with a neighbor it no longer has. (It lists this node
    // too: a newer record of A's own that did not would say that A withdrew.)
    let earlier = a.identity.sign(NodeRecord {
        id: a.id(),
        addr: "127.0.0.1:5000".into(),
        version: 5,
        neighbors: BTreeSet::from([identity(30).id(), rig.me.id()]),
    });
    a.send(&Frame::Gossip {
        records: vec![earlier.clone()],
    })
    .await;
    let a_id = a.id().to_string();
    until("A's earlier record is stored", || async {
        let status = rig.status().await;
        status
            .known_nodes
            .iter()
            .any(|k| k.node_id == a_id && k.version == 5)
            .then_some(())
    })
    .await;
    within("A goes away", a.writer().shutdown())
        .await
        .expect("the stream is open");
    assert_eq!(a.ended().await, Ended::Closed(a.id()));

    // A comes back at version 1 and hears what the mesh holds for it, so it can outbid it.
    let mut again = rig.open(10, false);
    again.handshake(&rig.me).await;
    let database = again.next_gossip().await;
    assert!(database.contains(&earlier), "{:?}", summary(&database));
    rig.stop().await;
    assert_eq!(again.ended().await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_stream_killed_before_it_hears_it_was_admitted_ends_as_a_duplicate() {
    let (rig, mut pool) = Rig::without_pool(1);
    let mut a = rig.open(10, true);
    a.handshake(&rig.me).await;
    let Some(PoolMsg::Admit {
        stream,
        dialed,
        reply,
    }) = within("the stream asks to be admitted", pool.recv()).await
    else {
        panic!("an admission request expected");
    };
    assert!(dialed);
    assert_eq!(stream.peer(), a.id());
    // A preferred stream to A replaced this one before its answer was read.
    stream.kill();
    // A dialer told `Cancelled` would stop dialing for good; the node is not stopping.
    assert_eq!(a.ended().await, Ended::Duplicate(a.id()));
    drop(reply); // held until now: the answer was never read
    assert!(a.rest().await.is_empty());
    assert!(
        rig.neighbors().await.is_empty(),
        "nothing reached the neighborhood"
    );

    // When the node is stopping, the same wait ends as `Cancelled`.
    let mut b = rig.open(11, true);
    b.handshake(&rig.me).await;
    let admit = within("the stream asks to be admitted", pool.recv()).await;
    assert!(matches!(admit, Some(PoolMsg::Admit { .. })), "{admit:?}");
    rig.stop().await;
    assert_eq!(b.ended().await, Ended::Cancelled);
}

/// A pool that is not running: the test hands it messages itself.
async fn idle_pool(me: &Identity, tracker: &TaskTracker, cancel: &CancellationToken) -> Pool {
    let neighborhood = crate::neighborhood::spawn_counting(
        me.clone(),
        ADDR.into(),
        crate::neighborhood::GossipTiming::default(),
        cancel.child_token(),
        tracker,
    )
    .expect("the node's first record is valid");
    let (tx, _rx) = mpsc::channel(1);
    let shared = Shared {
        me: me.id(),
        link: Arc::new(test_link(me.clone())),
        limits: Limits::from_fd_limit(1 << 20),
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
        verifiers: super::Verifiers::new(2),
        neighborhood,
        pool: PoolHandle { tx },
        cancel: cancel.child_token(),
        intake: cancel.child_token(),
        tracker: tracker.clone(),
        counters: Arc::default(),
        next_conn: Arc::new(AtomicU64::new(1)),
        verified: Arc::new(meshnode_protocol::VerifyCache::new(64)),
    };
    Pool::new(shared, loopback_listener().await)
}

fn admit(pool: &mut Pool, stream: &StreamHandle, dialed: bool) -> Admission {
    let (reply, mut answer) = oneshot::channel();
    pool.handle(PoolMsg::Admit {
        stream: stream.clone(),
        dialed,
        reply,
    });
    answer.try_recv().expect("the pool answers at once")
}

/// One end's view of a stream: its handle, and the token the pool cancels to end it.
fn end(conn: u64, peer: NodeId) -> (StreamHandle, CancellationToken) {
    let cancel = CancellationToken::new();
    let (handle, _queue) = StreamHandle::new(ConnId(conn), peer, cancel.clone());
    (handle, cancel)
}

#[tokio::test]
async fn when_both_ends_dial_each_other_both_keep_the_stream_dialed_by_the_smaller_id() {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (m, p) = (identity(1), identity(2));
    let smaller = m.id().min(p.id());
    // Each end may admit either stream first.
    for (m_first, p_first) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut kept = Vec::new();
        for (me, other, mine_first) in [(&m, &p, m_first), (&p, &m, p_first)] {
            let mut pool = idle_pool(me, &tracker, &cancel).await;
            // The stream this end dialed, and the one the other end dialed.
            let mine = end(1, other.id());
            let theirs = end(2, other.id());
            let order = if mine_first {
                [(&mine, true), (&theirs, false)]
            } else {
                [(&theirs, false), (&mine, true)]
            };
            let answers: Vec<Admission> = order
                .iter()
                .map(|((stream, _), dialed)| admit(&mut pool, stream, *dialed))
                .collect();
            let alive: Vec<bool> = order
                .iter()
                .zip(&answers)
                .map(|(((_, token), _), a)| *a == Admission::Admitted && !token.is_cancelled())
                .collect();
            assert_eq!(
                alive.iter().filter(|a| **a).count(),
                1,
                "one stream per neighbor: {answers:?}"
            );
            let dialer = |dialed: bool| if dialed { me.id() } else { other.id() };
            let (_, dialed) = order[alive.iter().position(|a| *a).expect("one is alive")];
            kept.push(dialer(dialed));
        }
        assert_eq!(
            kept,
            [smaller, smaller],
            "both ends keep the stream the smaller id dialed (m first: {m_first}, p first: {p_first})"
        );
    }
    cancel.cancel();
    tracker.close();
    within("the neighborhoods stop", tracker.wait()).await;
}

#[tokio::test]
async fn the_newer_stream_from_one_side_wins_and_a_dialer_hears_when_the_peer_is_gone() {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let me = identity(1);
    let mut pool = idle_pool(&me, &tracker, &cancel).await;
    let peer = identity(2).id();

    let (old, old_cancel) = end(1, peer);
    let (new, new_cancel) = end(2, peer);
    assert_eq!(admit(&mut pool, &old, false), Admission::Admitted);
    assert_eq!(admit(&mut pool, &new, false), Admission::Admitted);
    assert!(old_cancel.is_cancelled(), "the older stream is closed");
    assert!(!new_cancel.is_cancelled());

    let (reply, mut gone) = oneshot::channel();
    pool.handle(PoolMsg::WaitPeerGone { peer, reply });
    assert!(gone.try_recv().is_err(), "a stream to the peer is open");
    // The replaced stream's end is not the peer's.
    pool.handle(PoolMsg::Closed {
        conn: old.id(),
        peer,
    });
    assert!(gone.try_recv().is_err(), "the kept stream is still open");
    pool.handle(PoolMsg::Closed {
        conn: new.id(),
        peer,
    });
    gone.try_recv().expect("the waiter hears the peer is gone");

    let (reply, mut gone) = oneshot::channel();
    pool.handle(PoolMsg::WaitPeerGone { peer, reply });
    gone.try_recv().expect("no stream: answered at once");

    // With the peer gone, a stream from either direction is admitted again.
    let (again, _again_cancel) = end(3, peer);
    assert_eq!(admit(&mut pool, &again, true), Admission::Admitted);
    cancel.cancel();
    tracker.close();
    within("the neighborhood stops", tracker.wait()).await;
}

#[tokio::test]
async fn a_full_pool_refuses_new_neighbors_but_still_replaces_streams() {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut pool = idle_pool(&identity(1), &tracker, &cancel).await;
    let mut streams = Vec::with_capacity(MAX_STREAMS);
    for i in 0..MAX_STREAMS {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let (handle, token) = end(i as u64, NodeId(id));
        assert_eq!(admit(&mut pool, &handle, false), Admission::Admitted);
        streams.push((handle, token));
    }
    let (extra, _extra_cancel) = end(u64::MAX, identity(3).id());
    assert_eq!(admit(&mut pool, &extra, false), Admission::Full);

    let (first, first_cancel) = &streams[0];
    let (replacement, _cancel) = end(u64::MAX - 1, first.peer());
    assert_eq!(admit(&mut pool, &replacement, false), Admission::Admitted);
    assert!(first_cancel.is_cancelled());
    cancel.cancel();
    tracker.close();
    within("the neighborhood stops", tracker.wait()).await;
}

/// During a shutdown the pool publishes the names of the streams it still waits for, sorted,
/// and takes each out as it closes; the last close answers the shutdown.
#[tokio::test]
async fn the_streams_a_shutdown_waits_for_are_published_and_each_leaves_the_list_as_it_closes() {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut pool = idle_pool(&identity(1), &tracker, &cancel).await;
    let streams: Vec<_> = (2..6u8)
        .map(|seed| end(u64::from(seed), identity(seed).id()))
        .collect();
    for (stream, _) in &streams {
        assert_eq!(admit(&mut pool, stream, false), Admission::Admitted);
    }
    let (reply, done) = meshnode_shutdown::channel("pool");
    let (waiting, names) = tokio::sync::watch::channel(Vec::new());
    pool.handle(PoolMsg::Shutdown {
        reply,
        deadline: Instant::now() + Duration::from_secs(60),
        waiting,
    });
    let (hood_reply, hood_wait) = meshnode_shutdown::channel("neighborhood");
    hood_reply.done("notified 4 neighbors", Vec::new());
    pool.neighborhood_done(within("the report", hood_wait.wait()).await);
    let mut expected = names.borrow().clone();
    assert_eq!(expected.len(), streams.len(), "{expected:?}");
    assert!(expected.is_sorted(), "{expected:?}");
    for (stream, _) in &streams {
        let name = format!("({})", stream.id());
        assert_eq!(
            expected.iter().filter(|n| n.ends_with(&name)).count(),
            1,
            "{expected:?} names {name} once"
        );
    }
    // Closed in an order of their own: each leaves the list, the rest stay, still sorted.
    for at in [2, 0, 3, 1] {
        let (stream, _) = &streams[at];
        pool.handle(PoolMsg::Closed {
            conn: stream.id(),
            peer: stream.peer(),
        });
        let name = format!("({})", stream.id());
        expected.retain(|n| !n.ends_with(&name));
        assert_eq!(*names.borrow(), expected);
    }
    let report = within("the shutdown is answered", done.wait()).await;
    assert_eq!(report.outcome, meshnode_shutdown::Outcome::Done);
    assert_eq!(report.summary, "closed 4 streams");
    cancel.cancel();
    tracker.close();
    within("the neighborhood stops", tracker.wait()).await;
}

/// The withdrawal is this node's last frame on a stream: the writer shuts the write half down
/// right behind it, in the same step, without waiting for the pool to close the stream (here
/// the test plays the pool and never closes it).
#[tokio::test(start_paused = true)]
async fn the_withdrawal_is_followed_by_the_fin_without_waiting_for_the_pools_close() {
    let (rig, mut pool) = Rig::without_pool(1);
    let me = rig.me.id();
    let mut a = rig.open(10, false);
    a.handshake(&rig.me).await;
    let Some(PoolMsg::Admit { stream, reply, .. }) =
        within("the stream asks to be admitted", pool.recv()).await
    else {
        panic!("an admission request expected");
    };
    reply
        .send(Admission::Admitted)
        .expect("the stream waits for its answer");
    // The node lists A once it knows it.
    until("the node lists A", || {
        let neighbors = rig.neighbors();
        async { neighbors.await.contains(&a.id()).then_some(()) }
    })
    .await;

    let (done, wait) = meshnode_shutdown::channel("neighborhood");
    let withdraw = crate::neighborhood::NeighborhoodMsg::WithdrawFromNetwork {
        streams: vec![stream.clone()],
        reply: done,
    };
    within("the neighborhood takes it", rig.neighborhood.send(withdraw))
        .await
        .expect("the neighborhood is running");
    let report = within("the neighborhood answers", wait.wait()).await;
    assert!(report.outcome.is_done(), "{report:?}");

    // Every frame up to EOF: the last is the withdrawal, and it is the only one.
    let frames = a.rest().await;
    let withdrawals: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, frame)| {
            matches!(frame, Frame::Gossip { records }
                if records.iter().any(|r| r.id() == me && r.record.neighbors.is_empty()))
        })
        .map(|(at, _)| at)
        .collect();
    assert_eq!(withdrawals, vec![frames.len() - 1], "{frames:?}");
    // Nothing closed the stream but its writer: the handle was never asked to.
    assert!(!stream.drain.is_cancelled());

    rig.stop().await;
}

#[test]
fn nodes_given_one_verifiers_share_its_permits_and_a_config_has_one_per_core() {
    // A process that runs many nodes gives them one `Verifiers`: its clones share the permits,
    // so a thousand nodes run at most one check per core on the blocking pool, not a thousand.
    let shared = super::Verifiers::new(2);
    let (first, second) = (shared.clone(), shared.clone());
    assert!(first.shares_with(&second));
    assert!(!first.shares_with(&super::Verifiers::new(2)));
    let held = first.0.clone().try_acquire_owned().expect("a free permit");
    assert_eq!(second.available(), 1);
    drop(held);
    assert_eq!(second.available(), 2);
    // A config, by default, has one permit per core; never none.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let config = crate::Config::new(meshnode_protocol::Identity::from_seed([9; 32]));
    assert_eq!(config.verifiers.available(), cores);
    assert_eq!(super::Verifiers::new(0).available(), 1);
}
