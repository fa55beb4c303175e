//! The link handshake: Noise XX over the byte stream, each side proving its Ed25519 node id by
//! signing its Noise static key and the handshake hash, and both sides settling on the highest
//! protocol version they have in common. docs/protocol.md gives it byte by byte.
//!
//! Before the peer has proven its id this side does only small, fixed work: three messages of
//! at most a few hundred bytes, two Diffie-Hellman operations each way and one signature each
//! way. The node's own record and its database travel only afterwards, encrypted.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use meshnode_protocol::{Identity, NodeId, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::transport::{LinkCodec, LinkWriter, Transport};

/// The Noise protocol name: X25519 and SHA-256 reuse the curve and hash code the Ed25519
/// signatures already compile in, and ChaCha20-Poly1305 is fast in software on any CPU (no
/// dependence on AES instructions).
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
/// Mixed into the handshake hash by both sides: a peer of another protocol fails at once.
pub const PROLOGUE: &[u8] = b"meshnode-link";
/// Prefix of the bytes each side signs with its node key.
pub const IDENTITY_DOMAIN: &[u8] = b"meshnode-link-identity-v1\0";
/// The protocol versions this node speaks: 3, binary frames (version 1 was the plaintext hello,
/// 2 the JSON frames; neither is spoken any more).
pub const VERSIONS: (u16, u16) = (PROTOCOL_VERSION, PROTOCOL_VERSION);
/// Feature bit 0: `digest` frames (anti-entropy) on the link, both ways.
pub const FEATURE_DIGEST: u32 = 1;
/// Feature bits this node speaks.
pub const FEATURES: u32 = FEATURE_DIGEST;
/// Bytes of the identity payload before its optional extension bytes.
pub const PAYLOAD_LEN: usize = 2 + 2 + 4 + 4 + 32 + 64;
/// Largest handshake message either side accepts: the longest one is the second (an ephemeral
/// key, an encrypted static key and the encrypted payload) with room for extensions.
pub const MAX_HANDSHAKE_MESSAGE: usize = 1024;
/// A Noise message on the wire is at most this long (its length is a 2-byte prefix).
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// The Noise authentication tag on every message.
pub const TAG_LEN: usize = 16;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("read or write failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("a handshake message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("noise handshake failed: {0}")]
    Noise(#[from] snow::Error),
    #[error("malformed identity payload: {0}")]
    BadPayload(&'static str),
    #[error("the peer's node id is not a valid Ed25519 key")]
    BadKey,
    #[error("the peer's identity proof does not verify")]
    BadProof,
    #[error("the peer claims this node's own id")]
    OwnId,
    #[error("no common protocol version: peer speaks {}..{}, we speak {}..{}", .theirs.0, .theirs.1, .ours.0, .ours.1)]
    NoCommonVersion {
        ours: (u16, u16),
        theirs: (u16, u16),
    },
}

/// What one side brings to every handshake: its node identity, the Noise static key it proves
/// with, and what it offers.
#[derive(Clone)]
pub struct LocalLink {
    identity: Identity,
    noise_private: Arc<[u8]>,
    noise_public: [u8; 32],
    /// Lowest and highest protocol version spoken.
    pub versions: (u16, u16),
    pub features: u32,
    /// How long this side waits for anything from a neighbor before dropping it; told to the
    /// peer so it sends keepalives often enough.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for LocalLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLink")
            .field("id", &self.identity.id().short())
            .field("versions", &self.versions)
            .field("features", &self.features)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl LocalLink {
    /// A fresh Noise static key for `identity`, offering [`VERSIONS`] and [`FEATURES`].
    pub fn new(identity: Identity, idle_timeout: Duration) -> Result<Self, HandshakeError> {
        let keys = snow::Builder::new(params()).generate_keypair()?;
        let noise_public = keys
            .public
            .as_slice()
            .try_into()
            .map_err(|_| HandshakeError::BadPayload("a Noise public key is 32 bytes"))?;
        Ok(Self {
            identity,
            noise_private: keys.private.into(),
            noise_public,
            versions: VERSIONS,
            features: FEATURES,
            idle_timeout,
        })
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    /// The Noise static public key this side proves its id with.
    pub fn noise_public(&self) -> [u8; 32] {
        self.noise_public
    }

    /// This side's payload for a handshake whose hash so far is `hash`.
    pub(super) fn payload(&self, hash: &[u8]) -> Vec<u8> {
        let mut payload = Vec::with_capacity(PAYLOAD_LEN);
        payload.extend_from_slice(&self.versions.0.to_be_bytes());
        payload.extend_from_slice(&self.versions.1.to_be_bytes());
        payload.extend_from_slice(&self.features.to_be_bytes());
        payload.extend_from_slice(&timeout_ms(self.idle_timeout).to_be_bytes());
        payload.extend_from_slice(&self.identity.id().0);
        let signature =
            self.identity
                .sign_bytes(&signed_bytes(&self.noise_public, hash, &payload[..12]));
        payload.extend_from_slice(&signature);
        payload
    }
}

/// What the handshake proved and settled about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The node id the peer proved.
    pub peer: NodeId,
    /// The highest version both sides speak: the one used on this link.
    pub version: u16,
    /// The versions the peer speaks.
    pub peer_versions: (u16, u16),
    /// The feature bits both sides speak.
    pub features: u32,
    /// How long the peer waits for anything from this side before it drops the link.
    pub peer_idle_timeout: Duration,
}

impl Negotiated {
    /// Whether the peer speaks versions newer than the one in use, so that a frame type this
    /// node does not know is one of theirs rather than garbage.
    pub fn peer_is_newer(&self) -> bool {
        self.peer_versions.1 > self.version
    }

    /// How long this side may stay silent before it sends a keepalive: a third of the peer's
    /// timeout, so that two keepalives can be lost or late before the peer gives up.
    pub fn keepalive_interval(&self) -> Duration {
        (self.peer_idle_timeout / 3).max(Duration::from_millis(10))
    }
}

/// The peer's payload, read and checked.
pub(super) struct PeerPayload {
    pub(super) id: NodeId,
    versions: (u16, u16),
    features: u32,
    idle_timeout: Duration,
}

/// Runs the handshake as initiator (the side that dialed) or responder, then returns what was
/// settled, the decoder for what the peer sends and the writer for what this side sends.
pub async fn handshake<R, W>(
    mut read: R,
    mut write: W,
    initiator: bool,
    local: &LocalLink,
) -> Result<
    (
        Negotiated,
        tokio_util::codec::FramedRead<R, LinkCodec>,
        LinkWriter<W>,
    ),
    HandshakeError,
>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let builder = snow::Builder::new(params())
        .local_private_key(&local.noise_private)?
        .prologue(PROLOGUE)?;
    let mut state = if initiator {
        builder.build_initiator()?
    } else {
        builder.build_responder()?
    };
    let mut buf = vec![0u8; MAX_HANDSHAKE_MESSAGE];
    let mut out = vec![0u8; MAX_HANDSHAKE_MESSAGE];
    let theirs = if initiator {
        // -> e
        let n = state.write_message(&[], &mut out)?;
        send(&mut write, &out[..n]).await?;
        // <- e, ee, s, es, their proof
        let theirs = read_proof(&mut read, &mut state, &mut buf, local).await?;
        // -> s, se, our proof (sent even with no common version, so that both sides can say why)
        let payload = local.payload(state.get_handshake_hash());
        let n = state.write_message(&payload, &mut out)?;
        send(&mut write, &out[..n]).await?;
        theirs
    } else {
        // <- e
        let len = receive(&mut read, &mut buf).await?;
        state.read_message(&buf[..len], &mut out)?;
        // -> e, ee, s, es, our proof
        let payload = local.payload(state.get_handshake_hash());
        let n = state.write_message(&payload, &mut out)?;
        send(&mut write, &out[..n]).await?;
        // <- s, se, their proof
        read_proof(&mut read, &mut state, &mut buf, local).await?
    };
    let version = common_version(local.versions, theirs.versions)?;
    let negotiated = Negotiated {
        peer: theirs.id,
        version,
        peer_versions: theirs.versions,
        features: local.features & theirs.features,
        peer_idle_timeout: theirs.idle_timeout,
    };
    let transport = Arc::new(Transport::new(state.into_stateless_transport_mode()?));
    let reader = tokio_util::codec::FramedRead::new(read, LinkCodec::new(transport.clone()));
    Ok((negotiated, reader, LinkWriter::new(write, transport)))
}

/// Reads the peer's message that carries its static key and proof, and checks the proof.
async fn read_proof<R: AsyncRead + Unpin>(
    read: &mut R,
    state: &mut snow::HandshakeState,
    buf: &mut [u8],
    local: &LocalLink,
) -> Result<PeerPayload, HandshakeError> {
    let len = receive(read, buf).await?;
    // The hash before the message is what the peer signed: it covers this side's ephemeral
    // key, fresh for every handshake, so a proof from another handshake never verifies here.
    let hash = state.get_handshake_hash().to_vec();
    let mut payload = vec![0u8; MAX_HANDSHAKE_MESSAGE];
    let n = state.read_message(&buf[..len], &mut payload)?;
    let static_key = state
        .get_remote_static()
        .ok_or(HandshakeError::BadPayload("no static key"))?;
    let theirs = check_payload(&payload[..n], static_key, &hash)?;
    if theirs.id == local.id() {
        return Err(HandshakeError::OwnId);
    }
    Ok(theirs)
}

/// Parses a payload and verifies its signature over the sender's static key and `hash`.
pub(super) fn check_payload(
    payload: &[u8],
    static_key: &[u8],
    hash: &[u8],
) -> Result<PeerPayload, HandshakeError> {
    if payload.len() < PAYLOAD_LEN {
        return Err(HandshakeError::BadPayload("too short"));
    }
    let u16_at = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
    let u32_at =
        |i: usize| u32::from_be_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]]);
    let versions = (u16_at(0), u16_at(2));
    if versions.0 > versions.1 {
        return Err(HandshakeError::BadPayload(
            "lowest version above the highest",
        ));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&payload[12..44]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&payload[44..108]);
    let key = VerifyingKey::from_bytes(&id).map_err(|_| HandshakeError::BadKey)?;
    let signed = signed_bytes(static_key, hash, &payload[..12]);
    key.verify_strict(&signed, &Signature::from_bytes(&signature))
        .map_err(|_| HandshakeError::BadProof)?;
    Ok(PeerPayload {
        id: NodeId(id),
        versions,
        features: u32_at(4),
        idle_timeout: Duration::from_millis(u64::from(u32_at(8))),
    })
}

/// The highest version in both ranges.
pub fn common_version(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16, HandshakeError> {
    let (low, high) = (ours.0.max(theirs.0), ours.1.min(theirs.1));
    if low <= high {
        Ok(high)
    } else {
        Err(HandshakeError::NoCommonVersion { ours, theirs })
    }
}

/// What a side signs: the domain, its Noise static key, the handshake hash so far, and the
/// signed head of its payload (versions, features, timeout).
fn signed_bytes(static_key: &[u8], hash: &[u8], head: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(IDENTITY_DOMAIN.len() + 32 + 32 + head.len());
    bytes.extend_from_slice(IDENTITY_DOMAIN);
    bytes.extend_from_slice(static_key);
    bytes.extend_from_slice(hash);
    bytes.extend_from_slice(head);
    bytes
}

fn params() -> snow::params::NoiseParams {
    // The name is a constant this crate's tests parse; it cannot fail at run time.
    NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("NOISE_PARAMS is a valid Noise protocol name"))
}

fn timeout_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

async fn send<W: AsyncWrite + Unpin>(write: &mut W, message: &[u8]) -> Result<(), HandshakeError> {
    let len = u16::try_from(message.len()).map_err(|_| HandshakeError::TooLarge(message.len()))?;
    let mut wire = Vec::with_capacity(2 + message.len());
    wire.extend_from_slice(&len.to_be_bytes());
    wire.extend_from_slice(message);
    write.write_all(&wire).await?;
    write.flush().await?;
    Ok(())
}

/// One length-prefixed handshake message into `buf`; its length.
async fn receive<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut [u8],
) -> Result<usize, HandshakeError> {
    let mut len = [0u8; 2];
    read.read_exact(&mut len).await.map_err(eof_is_closed)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > buf.len() {
        return Err(HandshakeError::TooLarge(len));
    }
    read.read_exact(&mut buf[..len])
        .await
        .map_err(eof_is_closed)?;
    Ok(len)
}

fn eof_is_closed(e: std::io::Error) -> HandshakeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HandshakeError::Closed
    } else {
        HandshakeError::Io(e)
    }
}
