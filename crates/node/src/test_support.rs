//! Helpers for tests that play a node's neighbors over in-memory streams.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use meshnode_protocol::{Frame, Identity, Inbound, NodeId, NodeRecord, SignedRecord};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::FramedRead;

use crate::link::{LinkCodec, LinkWriter, LocalLink, handshake, next_inbound};

/// Bound on every await: generous, so that only a bug reaches it.
pub const BOUND: Duration = Duration::from_secs(60);

pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

pub fn identity(seed: u8) -> Identity {
    Identity::from_seed([seed; 32])
}

pub fn record(owner: &Identity, version: u64, neighbors: &[NodeId]) -> SignedRecord {
    owner.sign(NodeRecord {
        id: owner.id(),
        addr: format!("127.0.0.1:{}", 5000 + u16::from(owner.id().0[0])),
        version,
        neighbors: neighbors.iter().copied().collect(),
    })
}

/// The link settings test peers use: a timeout no test reaches unless it means to.
pub fn test_link(identity: Identity) -> LocalLink {
    let mut link = LocalLink::new(identity, Duration::from_secs(3600)).expect("a Noise key");
    // A played neighbor reads gossip only: it does not offer digests (anti-entropy), so the
    // node sends it none.
    link.features = 0;
    link
}

type Reader = FramedRead<ReadHalf<DuplexStream>, LinkCodec>;
type Writer = LinkWriter<WriteHalf<DuplexStream>>;

/// A neighbor played by the test over an in-memory stream. It dials: the node's end of the
/// stream is run as an accepted one.
pub struct Peer {
    pub identity: Identity,
    raw: Option<(ReadHalf<DuplexStream>, WriteHalf<DuplexStream>)>,
    link: Option<(Reader, Writer)>,
}

impl Peer {
    /// A peer and the node's end of its stream, with `pipe` bytes of buffer each way.
    pub fn new(identity: Identity, pipe: usize) -> (Self, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(pipe);
        let peer = Self {
            identity,
            raw: Some(tokio::io::split(ours)),
            link: None,
        };
        (peer, theirs)
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    fn link(&mut self) -> &mut (Reader, Writer) {
        self.link
            .as_mut()
            .expect("the test did the handshake first")
    }

    pub async fn send(&mut self, frame: &Frame) {
        let body = frame.encode().expect("the test's frames encode");
        within("the node takes a frame", self.link().1.send_frame(&body))
            .await
            .expect("the stream is open");
    }

    /// Tells the node this peer is alive, without a frame.
    pub async fn keepalive(&mut self) {
        within("the node takes a keepalive", self.link().1.keepalive())
            .await
            .expect("the stream is open");
    }

    /// Runs the link handshake, sends this peer's record (version 1, no neighbors) and returns
    /// the node's.
    pub async fn handshake(&mut self) -> SignedRecord {
        let (read, write) = self.raw.take().expect("one handshake per peer");
        let local = test_link(self.identity.clone());
        let (_, reader, writer) = within("the handshake", handshake(read, write, true, &local))
            .await
            .expect("the handshake succeeds");
        self.link = Some((reader, writer));
        let hello = Frame::Hello {
            record: record(&self.identity, 1, &[]),
        };
        self.send(&hello).await;
        match self.next().await {
            Some(Frame::Hello { record, .. }) => record,
            other => panic!("hello expected, got {other:?}"),
        }
    }

    /// The next frame from the node, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Frame> {
        let reader = &mut self.link().0;
        match within("a frame or the end of the stream", next_inbound(reader)).await {
            None => None,
            Some(Ok(Inbound::Frame(body))) => {
                Some(Frame::decode(&body).expect("the node sends valid frames"))
            }
            other => panic!("the node sent {other:?}"),
        }
    }

    /// Reads gossip until the node's own record lists exactly `neighbors`.
    pub async fn until_node_lists(&mut self, node: NodeId, neighbors: &BTreeSet<NodeId>) {
        loop {
            match self.next().await {
                Some(Frame::Gossip { records }) => {
                    if records
                        .iter()
                        .any(|r| r.id() == node && &r.record.neighbors == neighbors)
                    {
                        return;
                    }
                }
                other => panic!("gossip expected, got {other:?}"),
            }
        }
    }

    /// Every gossip frame up to the end of the stream, as the records of each frame.
    pub async fn rest(&mut self) -> Vec<Vec<SignedRecord>> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            match frame {
                Frame::Gossip { records } => frames.push(records),
                other => panic!("gossip expected, got {other:?}"),
            }
        }
        frames
    }
}
