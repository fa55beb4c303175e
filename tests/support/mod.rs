//! What the cross-crate and process-level tests share.
// Each test file uses a part of it.
#![allow(dead_code)]

pub mod browser;
pub mod daemon;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnode::link::{LinkCodec, LinkWriter, LocalLink, handshake, next_inbound};
use meshnode::{Config, Node};
use meshnode_protocol::ui::{StatusPayload, UI_SUBPROTOCOL};
use meshnode_protocol::{Frame, Identity, Inbound, NodeId, NodeRecord, SignedRecord};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::FramedRead;

/// The link settings of a neighbor played by a test: a timeout no test reaches.
pub fn test_link(identity: Identity) -> LocalLink {
    let mut link = LocalLink::new(identity, Duration::from_secs(3600)).expect("a Noise key");
    // A played neighbor reads gossip only: it does not offer digests (anti-entropy), so the
    // node sends it none.
    link.features = 0;
    link
}

/// A neighbor that does the handshake, sends its record and then neither reads nor hangs up,
/// so that a node's shutdown stays under way until its deadline. It is alive (it sends
/// keepalives), only not reading. Dropping it closes the connection.
pub struct StuckNeighbor {
    pub id: NodeId,
    _reader: FramedRead<OwnedReadHalf, LinkCodec>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for StuckNeighbor {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

pub async fn stuck_neighbor(node: SocketAddr) -> StuckNeighbor {
    let stream = TcpStream::connect(node).await.expect("the node listens");
    stuck_neighbor_over(stream).await
}

/// A [`StuckNeighbor`] over a stream already connected (say, with a tiny receive buffer).
pub async fn stuck_neighbor_over(stream: TcpStream) -> StuckNeighbor {
    let peer = FakePeer::hello_only(stream, Identity::from_seed([99; 32])).await;
    let id = peer.id();
    let (reader, mut writer) = peer.into_parts();
    let keepalive = tokio::spawn(async move {
        // Stops when a keepalive cannot be written (the node has gone), or when dropped.
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.keepalive().await.is_err() {
                return;
            }
        }
    });
    StuckNeighbor {
        id,
        _reader: reader,
        keepalive,
    }
}

/// Resets the peer's connection (RST, not FIN), as a crashing host or a middlebox would.
pub async fn reset(peer: FakePeer) {
    let (reader, writer) = peer.into_parts();
    let stream = reader
        .into_inner()
        .reunite(writer.into_inner())
        .expect("the halves of one stream");
    stream.set_zero_linger().expect("linger set");
    drop(stream);
}

/// Bound on every wait in these tests: generous, so that only a bug reaches it.
pub const BOUND: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test after [`BOUND`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

/// Polls `check` until it holds, failing the test after [`BOUND`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a node from `config`, failing the test if it does not start within [`BOUND`].
pub async fn start(config: Config) -> Node {
    within("start", meshnode::start(config))
        .await
        .expect("the node starts")
}

/// A node with the identity of `seed` that dials `neighbors`.
pub async fn node_dialing(seed: u8, neighbors: &[SocketAddr]) -> Node {
    let mut config = Config::new(Identity::from_seed([seed; 32]));
    config.neighbors = neighbors.iter().map(ToString::to_string).collect();
    start(config).await
}

/// A node with the identity of `seed` that dials the nodes `neighbors`.
pub async fn node(seed: u8, neighbors: &[&Node]) -> Node {
    let addrs: Vec<SocketAddr> = neighbors.iter().map(|n| n.listen_addr()).collect();
    node_dialing(seed, &addrs).await
}

/// What `node` answers to a status request.
pub async fn status(node: &Node) -> StatusPayload {
    within("status", node.status()).await.expect("status")
}

/// Whether `node` lists `peer` among its neighbors.
pub async fn lists(node: &Node, peer: NodeId) -> bool {
    let id = peer.to_string();
    status(node).await.neighbors.iter().any(|n| n.node_id == id)
}

/// Whether the status `s` shows that the node `departed` has withdrawn: no longer a neighbor,
/// and known by its withdrawal record, which lists no neighbors.
pub fn knows_departure(s: &StatusPayload, departed: &str) -> bool {
    !s.neighbors.iter().any(|n| n.node_id == departed)
        && s.known_nodes
            .iter()
            .any(|k| k.node_id == departed && k.neighbors.is_empty())
}

/// A raw websocket to a node's UI.
pub type Websocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw websocket to the UI at `ui` with the UI subprotocol, so that the test sees the
/// node's text exactly as sent.
pub async fn websocket(ui: SocketAddr) -> Websocket {
    let mut request = format!("ws://{ui}/")
        .into_client_request()
        .expect("a request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    let (socket, _) = within(
        "the UI handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the UI accepts");
    socket
}

/// A fresh directory for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("meshnode-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A neighbor played by the test over a real socket: it does the handshake, then sends what
/// the test wants, well-formed or not, and reads what the node sends.
pub struct FakePeer {
    pub identity: Identity,
    reader: FramedRead<OwnedReadHalf, LinkCodec>,
    writer: LinkWriter<OwnedWriteHalf>,
}

impl FakePeer {
    /// Connects to the node at `node` and exchanges hellos.
    pub async fn connect(node: SocketAddr, identity: Identity) -> Self {
        let stream = within("connect", TcpStream::connect(node))
            .await
            .expect("the node listens");
        Self::over(stream, identity).await
    }

    /// Exchanges hellos over an already connected stream.
    pub async fn over(stream: TcpStream, identity: Identity) -> Self {
        let mut peer = Self::hello_only(stream, identity).await;
        match peer.next().await {
            Some(Frame::Hello { .. }) => peer,
            other => panic!("hello expected, got {other:?}"),
        }
    }

    /// Runs the link handshake (as the side that dialed) over an already connected stream and
    /// sends its record, without waiting for the node's.
    pub async fn hello_only(stream: TcpStream, identity: Identity) -> Self {
        let (read, write) = stream.into_split();
        let local = test_link(identity.clone());
        let (_, reader, writer) =
            within("the link handshake", handshake(read, write, true, &local))
                .await
                .expect("the link handshake succeeds");
        let mut peer = Self {
            reader,
            writer,
            identity,
        };
        let hello = Frame::Hello {
            record: peer.record_at(1, "127.0.0.1:9"),
        };
        peer.send(&hello).await;
        peer
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    /// This peer's own record at `version`, with no neighbors.
    pub fn record_at(&self, version: u64, addr: &str) -> SignedRecord {
        self.identity.sign(NodeRecord {
            id: self.identity.id(),
            addr: addr.into(),
            version,
            neighbors: BTreeSet::new(),
        })
    }

    /// Sends one well-formed frame.
    pub async fn send(&mut self, frame: &Frame) {
        let body = frame.encode().expect("encodes");
        self.try_send_raw(&framed(&body))
            .await
            .expect("the node reads");
    }

    /// Sends bytes as they are onto the link's plaintext stream (encrypted, so that they reach
    /// the node's frame decoder): an error once the node has hung up.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("a write", self.writer.send_raw(bytes)).await
    }

    /// Ends this side of the stream.
    pub async fn finish(&mut self) {
        let _ = within("a shutdown", self.writer.shutdown()).await;
    }

    /// The next frame from the node; `None` at the end of the stream (or on a reset).
    pub async fn next(&mut self) -> Option<Frame> {
        match within("a frame from the node", next_inbound(&mut self.reader)).await {
            Some(Ok(Inbound::Frame(body))) => {
                Some(Frame::decode(&body).expect("the node sends valid frames"))
            }
            Some(Ok(Inbound::Oversized { len })) => panic!("the node sent {len} bytes"),
            Some(Err(_)) | None => None,
        }
    }

    /// Every frame until the node ends the stream.
    pub async fn rest(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            frames.push(frame);
        }
        frames
    }

    /// Reads until a gossip frame carries a record of `id` that `matches`.
    pub async fn until_record(&mut self, id: NodeId, matches: impl Fn(&NodeRecord) -> bool) {
        loop {
            match self.next().await {
                Some(Frame::Gossip { records }) => {
                    if records.iter().any(|r| r.id() == id && matches(&r.record)) {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("the stream ended before a matching record of {id}"),
            }
        }
    }

    /// Splits the peer, for tasks that read and write at the same time.
    pub fn into_parts(
        self,
    ) -> (
        FramedRead<OwnedReadHalf, LinkCodec>,
        LinkWriter<OwnedWriteHalf>,
    ) {
        (self.reader, self.writer)
    }
}

/// A frame body with its length prefix.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("a frame under 4 GiB");
    let mut wire = len.to_be_bytes().to_vec();
    wire.extend_from_slice(body);
    wire
}

/// True when `frame` carries a record of `node` that lists no neighbors: its withdrawal.
pub fn is_withdrawal_of(frame: &Frame, node: NodeId) -> bool {
    matches!(frame, Frame::Gossip { records }
        if records.iter().any(|r| r.id() == node && r.record.neighbors.is_empty()))
}
