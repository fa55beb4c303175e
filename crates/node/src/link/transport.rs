//! The encrypted link after the handshake. Frames (a 4-byte length, then the body) form a
//! plaintext byte stream that travels in Noise transport messages of at most 65,535 bytes, each
//! with a 2-byte length before it; a frame larger than one message spans several, and the
//! decoder reassembles it. An empty message is a keepalive.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use meshnode_protocol::{FrameCodec, Inbound, frame_header};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::handshake::{MAX_NOISE_MESSAGE, TAG_LEN};

/// Most plaintext bytes in one Noise message.
pub const MAX_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// Largest buffer an idle link keeps; a larger, empty one is given back.
const IDLE_BUFFER: usize = 8 * 1024;
/// The writer encrypts a large frame in batches of about this many bytes, so that it never holds
/// a whole encrypted copy of a 1 MiB frame.
const WRITE_BATCH: usize = 64 * 1024;

/// The keys of one link, shared by its reader and writer; each keeps its own nonce.
pub struct Transport {
    state: snow::StatelessTransportState,
}

impl Transport {
    pub(super) fn new(state: snow::StatelessTransportState) -> Self {
        Self { state }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

/// What the link's reader yields.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkItem {
    /// A whole frame (or an oversized one, skipped), as [`FrameCodec`] reports it.
    Inbound(Inbound),
    /// A message arrived that completed no frame: a keepalive, or part of a large frame. The
    /// peer is alive.
    Progress,
}

/// Decrypts Noise messages and decodes the frames in their plaintext.
#[derive(Debug)]
pub struct LinkCodec {
    transport: Arc<Transport>,
    nonce: u64,
    plain: BytesMut,
    frames: FrameCodec,
}

impl LinkCodec {
    pub(super) fn new(transport: Arc<Transport>) -> Self {
        Self {
            transport,
            nonce: 0,
            plain: BytesMut::new(),
            frames: FrameCodec::new(),
        }
    }

    /// Decrypts the next whole message in `src`, if there is one, onto the plaintext.
    fn decrypt_next(&mut self, src: &mut BytesMut) -> io::Result<bool> {
        if src.len() < 2 {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([src[0], src[1]]));
        if len < TAG_LEN {
            return Err(invalid("a link message shorter than its tag"));
        }
        if src.len() < 2 + len {
            src.reserve(2 + len - src.len());
            return Ok(false);
        }
        src.advance(2);
        let message = src.split_to(len);
        let start = self.plain.len();
        self.plain.resize(start + len, 0);
        let n = self
            .transport
            .state
            .read_message(self.nonce, &message, &mut self.plain[start..])
            .map_err(|_| invalid("a link message failed authentication"))?;
        self.nonce += 1;
        self.plain.truncate(start + n);
        Ok(true)
    }
}

impl Decoder for LinkCodec {
    type Item = LinkItem;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<LinkItem>> {
        if let Some(inbound) = self.frames.decode(&mut self.plain)? {
            return Ok(Some(LinkItem::Inbound(inbound)));
        }
        if !self.decrypt_next(src)? {
            return Ok(None);
        }
        let item = match self.frames.decode(&mut self.plain)? {
            Some(inbound) => LinkItem::Inbound(inbound),
            None => LinkItem::Progress,
        };
        if self.plain.is_empty() && self.plain.capacity() > IDLE_BUFFER {
            self.plain = BytesMut::new();
        }
        Ok(Some(item))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> io::Result<Option<LinkItem>> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => match self.frames.decode_eof(&mut self.plain)? {
                Some(inbound) => Ok(Some(LinkItem::Inbound(inbound))),
                None => Ok(None),
            },
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the link ended inside a message",
            )),
        }
    }
}

/// Encrypts frames, and keepalives, onto the write half.
#[derive(Debug)]
pub struct LinkWriter<W> {
    inner: W,
    transport: Arc<Transport>,
    nonce: u64,
}

impl<W: AsyncWrite + Unpin> LinkWriter<W> {
    pub(super) fn new(inner: W, transport: Arc<Transport>) -> Self {
        Self {
            inner,
            transport,
            nonce: 0,
        }
    }

    /// Sends one frame: its length, then its body.
    pub async fn send_frame(&mut self, body: &[u8]) -> io::Result<()> {
        let header =
            frame_header(body.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut plain = (&header[..]).chain(body);
        self.send_plain(&mut plain).await
    }

    /// Sends bytes of the plaintext stream as they are, well-formed frames or not.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.send_plain(&mut &bytes[..]).await
    }

    /// Sends an empty message: it tells the peer this side is alive.
    pub async fn keepalive(&mut self) -> io::Result<()> {
        let mut wire = Vec::with_capacity(2 + TAG_LEN);
        self.seal(&[], &mut wire)?;
        self.inner.write_all(&wire).await?;
        self.inner.flush().await
    }

    /// Shuts the write half down (the peer reads EOF).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }

    /// The write half, for a caller that wants the socket back.
    pub fn into_inner(self) -> W {
        self.inner
    }

    async fn send_plain(&mut self, plain: &mut impl Buf) -> io::Result<()> {
        let mut chunk = Vec::with_capacity(plain.remaining().min(MAX_PLAINTEXT));
        let mut wire = Vec::with_capacity(
            (plain.remaining() + 2 + TAG_LEN).min(WRITE_BATCH + 2 + MAX_NOISE_MESSAGE),
        );
        while plain.has_remaining() {
            chunk.clear();
            while chunk.len() < MAX_PLAINTEXT && plain.has_remaining() {
                let piece = plain.chunk();
                let take = piece.len().min(MAX_PLAINTEXT - chunk.len());
                chunk.extend_from_slice(&piece[..take]);
                plain.advance(take);
            }
            self.seal(&chunk, &mut wire)?;
            if wire.len() >= WRITE_BATCH {
                self.inner.write_all(&wire).await?;
                wire.clear();
            }
        }
        if !wire.is_empty() {
            self.inner.write_all(&wire).await?;
        }
        self.inner.flush().await
    }

    /// Appends one message carrying `chunk` to `wire`.
    fn seal(&mut self, chunk: &[u8], wire: &mut Vec<u8>) -> io::Result<()> {
        let len = chunk.len() + TAG_LEN;
        let prefix = u16::try_from(len).map_err(|_| invalid("a link message over 65,535 bytes"))?;
        let start = wire.len();
        wire.extend_from_slice(&prefix.to_be_bytes());
        wire.resize(start + 2 + len, 0);
        let n = self
            .transport
            .state
            .write_message(self.nonce, chunk, &mut wire[start + 2..])
            .map_err(|e| io::Error::other(format!("encryption failed: {e}")))?;
        debug_assert_eq!(n, len);
        self.nonce += 1;
        Ok(())
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The next frame from a link's reader, past keepalives and partial frames; `None` at its end.
pub async fn next_inbound<R>(
    reader: &mut tokio_util::codec::FramedRead<R, LinkCodec>,
) -> Option<io::Result<Inbound>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use futures::StreamExt;
    loop {
        match reader.next().await? {
            Ok(LinkItem::Progress) => {}
            Ok(LinkItem::Inbound(inbound)) => return Some(Ok(inbound)),
            Err(e) => return Some(Err(e)),
        }
    }
}
