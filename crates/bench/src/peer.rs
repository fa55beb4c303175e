//! A light neighbor: speaks the real handshake and reads frames, nothing more, so that
//! thousands fit beside a node on two cores.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshnode::link::{LinkCodec, LinkWriter, LocalLink, Negotiated, handshake, next_inbound};
use meshnode_protocol::{
    Frame, Identity, Inbound, NodeId, NodeRecord, SignedRecord, gossip_records,
};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// Largest read buffer a light neighbor keeps while idle, as a meshnode's reader.
const IDLE_BUFFER: usize = 8 * 1024;

/// When a light neighbor saw the node's withdrawal and its EOF.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub withdrawal: Instant,
    pub eof: Instant,
}

/// How many of a node's light neighbors have seen its record list all of them: the node paces
/// the publishes of a large own record, so its gossip has died down only once each has.
#[derive(Debug)]
pub struct Listed {
    neighbors: usize,
    seen: AtomicUsize,
}

impl Listed {
    pub fn new(neighbors: usize) -> Arc<Self> {
        Arc::new(Self {
            neighbors,
            seen: AtomicUsize::new(0),
        })
    }

    /// Whether every light neighbor has seen the node's record list them all.
    pub fn by_all(&self) -> bool {
        self.seen.load(Ordering::Acquire) >= self.neighbors
    }

    /// Waits, polling, until [`Self::by_all`], at most `limit`.
    pub async fn wait(&self, limit: Duration) -> Result<(), String> {
        let waited = async {
            while !self.by_all() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(limit, waited).await.map_err(|_| {
            format!(
                "{} of {} neighbors saw the node's record list them all within {limit:?}",
                self.seen.load(Ordering::Acquire),
                self.neighbors
            )
        })
    }
}

/// An identity for light neighbor `index`, cheap and reproducible.
pub fn identity(index: u32) -> Identity {
    let mut seed = [0x5a; 32];
    seed[..4].copy_from_slice(&index.to_be_bytes());
    Identity::from_seed(seed)
}

/// A light peer's side of a link: what the handshake settled, the stream's reading half
/// (framed) and its writing half.
pub type Joined = (
    Negotiated,
    FramedRead<OwnedReadHalf, LinkCodec>,
    LinkWriter<OwnedWriteHalf>,
);

/// Dials `node` as `me`, does the real handshake and sends `me`'s hello (a record listing
/// nobody), as a new neighbor does. A node at its limit of handshakes in progress closes new
/// connections at once, so a failed handshake is tried again shortly, up to `attempts` times,
/// as a dialer would. The link never times the node out; its keepalives keep the node from
/// timing it out.
pub async fn join(node: SocketAddr, me: &Identity, attempts: u32) -> Result<Joined, String> {
    let mut local = LocalLink::new(me.clone(), Duration::from_secs(3600))
        .map_err(|e| format!("link key: {e}"))?;
    // A light peer reads the node's record only: it offers no digests (anti-entropy).
    local.features = 0;
    let mut attempt = 0;
    let (link, reader, mut writer) = loop {
        attempt += 1;
        let stream = TcpStream::connect(node)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        match handshake(read, write, true, &local).await {
            Ok(link) => break link,
            Err(e) if attempt >= attempts => return Err(format!("handshake: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let record = me.sign(NodeRecord {
        id: me.id(),
        addr: "127.0.0.1:9".into(),
        version: 1,
        neighbors: Default::default(),
    });
    let hello = Frame::Hello { record }
        .encode()
        .map_err(|e| e.to_string())?;
    writer
        .send_frame(&hello)
        .await
        .map_err(|e| format!("hello: {e}"))?;
    Ok((link, reader, writer))
}

/// The records of `node` in a gossip frame's body, decoded (no signature checks): only the
/// node's own record matters to a light neighbor, found by the ids at the records' heads. The
/// floor's readers (crate::shutdown) read their frames with this same function.
pub fn node_records(body: &[u8], node: NodeId) -> Vec<SignedRecord> {
    let Ok(found) = gossip_records(body) else {
        return Vec::new();
    };
    found
        .iter()
        .filter(|(id, _)| *id == node)
        .filter_map(|(_, bytes)| SignedRecord::from_wire(bytes).ok())
        .collect()
}

/// Connects to `node` as `me` ([`join`]), signals `ready` once the node's record lists it,
/// counts itself in `listed` once the node's record lists all of its neighbors, then reads
/// until EOF and reports when the withdrawal (the node's record listing nobody) and the EOF
/// arrived. It hangs up at EOF, as a meshnode does.
pub async fn run(
    node: SocketAddr,
    node_id: NodeId,
    me: Identity,
    ready: oneshot::Sender<()>,
    listed: Arc<Listed>,
) -> Result<Arrival, String> {
    let (link, mut reader, mut writer) = join(node, &me, 20).await?;
    let keepalive = link.keepalive_interval();
    let mut last_sent = Instant::now();
    let mut ready = Some(ready);
    let mut withdrawal = None;
    let mut saw_all = false;
    loop {
        let next = tokio::time::timeout_at(last_sent + keepalive, next_inbound(&mut reader));
        let Ok(next) = next.await else {
            writer
                .keepalive()
                .await
                .map_err(|e| format!("keepalive: {e}"))?;
            last_sent = Instant::now();
            continue;
        };
        // Give back a large read buffer once it is empty, as a meshnode's own reader does, so
        // that a neighbor that lived through the set-up's large records holds no more than one
        // that did not (the floor's readers, crate::shutdown).
        let buffer = reader.read_buffer_mut();
        if buffer.is_empty() && buffer.capacity() > IDLE_BUFFER {
            *buffer = bytes::BytesMut::new();
        }
        let frame = match next {
            None => break,
            Some(Ok(Inbound::Frame(body))) => body,
            Some(Ok(Inbound::Oversized { len })) => {
                return Err(format!("oversized frame of {len}"));
            }
            Some(Err(e)) => return Err(format!("read: {e}")),
        };
        for record in node_records(&frame, node_id) {
            if record.record.neighbors.contains(&me.id()) {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                if !saw_all && record.record.neighbors.len() >= listed.neighbors {
                    saw_all = true;
                    listed.seen.fetch_add(1, Ordering::AcqRel);
                }
            } else if record.record.neighbors.is_empty() && withdrawal.is_none() && ready.is_none()
            {
                withdrawal = Some(Instant::now());
            }
        }
    }
    let eof = Instant::now();
    drop(writer);
    match withdrawal {
        Some(withdrawal) => Ok(Arrival { withdrawal, eof }),
        None => Err("EOF without a withdrawal".into()),
    }
}
