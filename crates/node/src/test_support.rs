//! Helpers for tests that play a node's neighbors over in-memory streams.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshnode_protocol::{
    Frame, FrameCodec, Identity, Inbound, NodeId, NodeRecord, PROTOCOL_VERSION, SignedRecord,
};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

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

/// A neighbor played by the test over an in-memory stream.
pub struct Peer {
    pub identity: Identity,
    reader: FramedRead<ReadHalf<DuplexStream>, FrameCodec>,
    writer: FramedWrite<WriteHalf<DuplexStream>, FrameCodec>,
}

impl Peer {
    /// A peer and the node's end of its stream, with `pipe` bytes of buffer each way.
    pub fn new(identity: Identity, pipe: usize) -> (Self, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(pipe);
        let (read, write) = tokio::io::split(ours);
        let peer = Self {
            identity,
            reader: FramedRead::new(read, FrameCodec::new()),
            writer: FramedWrite::new(write, FrameCodec::new()),
        };
        (peer, theirs)
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    pub async fn send(&mut self, frame: &Frame) {
        let body = frame.encode().expect("the test's frames encode");
        within("the node takes a frame", self.writer.send(body))
            .await
            .expect("the stream is open");
    }

    /// Sends this peer's hello (version 1, no neighbors) and returns the node's.
    pub async fn handshake(&mut self) -> SignedRecord {
        let hello = Frame::Hello {
            protocol: PROTOCOL_VERSION,
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
        match within("a frame or the end of the stream", self.reader.next()).await {
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
