//! Node identities and the signed records that gossip carries.
//!
//! A node's id is its Ed25519 public key. Its record lists the address it accepts neighbors on
//! and the ids of its neighbors (A listing B is the half-neighborship A->B), with a version
//! that only the owner raises, all signed by the owner over a fixed byte layout
//! ([`NodeRecord::signing_bytes`]). On the wire a record is that layout without its domain tag,
//! then the signature ([`WireRecord`]), and a receiver keeps the bytes it verified, so that a
//! record is encoded once, by its owner, however often it is forwarded.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::str::FromStr;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest `addr` a record may carry, in bytes.
pub const MAX_ADDR_LEN: usize = 255;
/// Most neighbors a record may list.
pub const MAX_NEIGHBORS: usize = 8_192;
const SIGNING_DOMAIN: &[u8] = b"meshnode-record-v1\0";
/// Bytes of a record on the wire besides its addr and neighbors: id 32, version 8, the two
/// lengths 4 each, signature 64.
pub const RECORD_FIXED_LEN: usize = 32 + 8 + 4 + 4 + SIGNATURE_LEN;
const SIGNATURE_LEN: usize = 64;

/// The size on the wire of a record whose addr is `addr_len` bytes and which lists `neighbors`
/// neighbors: 112 + addr + 32 per neighbor.
pub const fn wire_len(addr_len: usize, neighbors: usize) -> usize {
    RECORD_FIXED_LEN + addr_len + 32 * neighbors
}

/// Why bytes are not a well-formed record (or frame) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("cut short in its {0}")]
    Truncated(&'static str),
    #[error("{0} bytes after its end")]
    Trailing(usize),
    #[error("addr of {0} bytes exceeds the limit of {MAX_ADDR_LEN}")]
    AddrTooLong(u32),
    #[error("addr is not UTF-8")]
    AddrNotUtf8,
    #[error("{0} neighbors exceed the limit of {MAX_NEIGHBORS}")]
    TooManyNeighbors(u32),
    #[error("neighbors are not in strictly ascending order")]
    NeighborsUnordered,
    #[error("a count of {0} records is more than the frame's bytes can hold")]
    TooManyRecords(u32),
}

/// What can be wrong with a key, an id or a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("node id must be 64 hex digits")]
    BadId,
    #[error("node id {0} is not a valid Ed25519 public key")]
    BadKey(NodeId),
    #[error("signature of record {0} does not verify")]
    BadSignature(NodeId),
    #[error("record {0} is malformed: {1}")]
    Malformed(NodeId, &'static str),
    #[error("secret key must be 64 hex digits")]
    BadSecret,
    #[error("no randomness available to make a key: {0}")]
    NoRandomness(String),
}

/// A node's id: its Ed25519 public key, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The first eight hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| RecordError::BadId)?;
        Ok(NodeId(bytes))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The signed content of a node record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Where the node accepts neighbors, as `HOST:PORT`.
    pub addr: String,
    /// Raised by one on every change; a receiver keeps only the highest it has seen (and of two
    /// records at one version, the one with the greater signature).
    pub version: u64,
    /// The node's half-neighborships.
    pub neighbors: BTreeSet<NodeId>,
}

impl NodeRecord {
    /// The bytes the owner signs: a domain tag, then id, version, addr and neighbors in a
    /// fixed binary layout, so that no JSON formatting choice can change a signature.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + self.layout_len());
        out.extend_from_slice(SIGNING_DOMAIN);
        self.put_layout(&mut out);
        out
    }

    /// Bytes of the signed layout without the domain tag.
    fn layout_len(&self) -> usize {
        wire_len(self.addr.len(), self.neighbors.len()) - SIGNATURE_LEN
    }

    /// The signed layout without the domain tag: what a record is on the wire, but for its
    /// signature.
    fn put_layout(&self, out: &mut impl BufMut) {
        out.put_slice(&self.id.0);
        out.put_u64(self.version);
        out.put_u32(len_u32(self.addr.len()));
        out.put_slice(self.addr.as_bytes());
        out.put_u32(len_u32(self.neighbors.len()));
        for n in &self.neighbors {
            out.put_slice(&n.0);
        }
    }

    fn check_shape(&self) -> Result<(), RecordError> {
        if self.addr.len() > MAX_ADDR_LEN {
            return Err(RecordError::Malformed(self.id, "addr too long"));
        }
        if self.neighbors.len() > MAX_NEIGHBORS {
            return Err(RecordError::Malformed(self.id, "too many neighbors"));
        }
        if self.neighbors.contains(&self.id) {
            return Err(RecordError::Malformed(
                self.id,
                "lists itself as a neighbor",
            ));
        }
        Ok(())
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A record with its owner's signature, as it travels in gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    #[serde(flatten)]
    pub record: NodeRecord,
    #[serde(with = "sig_hex")]
    pub signature: [u8; 64],
}

impl SignedRecord {
    /// Checks that the record is well formed and signed by the key its id names.
    pub fn verify(&self) -> Result<(), RecordError> {
        let id = self.record.id;
        self.record.check_shape()?;
        let key = VerifyingKey::from_bytes(&id.0).map_err(|_| RecordError::BadKey(id))?;
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.record.signing_bytes(), &sig)
            .map_err(|_| RecordError::BadSignature(id))
    }

    /// Verifies the record and wraps it as proof that it was checked.
    pub fn into_verified(self) -> Result<VerifiedRecord, RecordError> {
        WireRecord::from(self).into_verified()
    }

    /// The record's size on the wire: 112 + addr + 32 per neighbor.
    pub fn wire_len(&self) -> usize {
        wire_len(self.record.addr.len(), self.record.neighbors.len())
    }

    /// Appends the record's wire bytes to `out`.
    pub fn encode_into(&self, out: &mut impl BufMut) {
        self.record.put_layout(out);
        out.put_slice(&self.signature);
    }

    /// The record's wire bytes (see docs/protocol.md, "Node records").
    pub fn to_wire(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.wire_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Reads a record that fills `bytes` exactly. Checks its shape, not its signature.
    pub fn from_wire(bytes: &[u8]) -> Result<SignedRecord, WireError> {
        let (record, used) = read_record(bytes)?;
        match bytes.len() - used {
            0 => Ok(record),
            extra => Err(WireError::Trailing(extra)),
        }
    }

    pub fn id(&self) -> NodeId {
        self.record.id
    }

    pub fn version(&self) -> u64 {
        self.record.version
    }
}

/// A record with its exact wire bytes: as it was read off the wire (the bytes are copied out of
/// the frame, so that a stored record does not keep its whole frame alive), or encoded once
/// from a [`SignedRecord`]. The two always agree: only [`read_record`] and the `From` impl make
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    signed: SignedRecord,
    wire: Bytes,
}

impl WireRecord {
    /// Reads a record that fills `bytes` exactly. Checks its shape, not its signature.
    pub fn decode(bytes: &[u8]) -> Result<WireRecord, WireError> {
        let signed = SignedRecord::from_wire(bytes)?;
        Ok(WireRecord {
            signed,
            wire: Bytes::copy_from_slice(bytes),
        })
    }

    /// Reads the record at the start of `bytes`, and says how many bytes it took.
    pub(crate) fn read(bytes: &[u8]) -> Result<(WireRecord, usize), WireError> {
        let (signed, used) = read_record(bytes)?;
        let wire = Bytes::copy_from_slice(&bytes[..used]);
        Ok((WireRecord { signed, wire }, used))
    }

    pub fn signed(&self) -> &SignedRecord {
        &self.signed
    }

    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    pub fn id(&self) -> NodeId {
        self.signed.record.id
    }

    pub fn into_signed(self) -> SignedRecord {
        self.signed
    }

    /// Checks that the record is well formed and signed by the key its id names, over the
    /// domain tag and the bytes as they came (no re-encoding).
    pub fn verify(&self) -> Result<(), RecordError> {
        let id = self.id();
        self.signed.record.check_shape()?;
        let key = VerifyingKey::from_bytes(&id.0).map_err(|_| RecordError::BadKey(id))?;
        let sig = Signature::from_bytes(&self.signed.signature);
        let layout = &self.wire[..self.wire.len().saturating_sub(SIGNATURE_LEN)];
        let mut message = Vec::with_capacity(SIGNING_DOMAIN.len() + layout.len());
        message.extend_from_slice(SIGNING_DOMAIN);
        message.extend_from_slice(layout);
        key.verify_strict(&message, &sig)
            .map_err(|_| RecordError::BadSignature(id))
    }

    /// Verifies the record and wraps it as proof that it was checked.
    pub fn into_verified(self) -> Result<VerifiedRecord, RecordError> {
        self.verify()?;
        Ok(VerifiedRecord(self))
    }
}

impl From<SignedRecord> for WireRecord {
    fn from(signed: SignedRecord) -> Self {
        let wire = signed.to_wire();
        WireRecord { signed, wire }
    }
}

/// Reads the record at the start of `bytes`: its value and how many bytes it took. Every length
/// and count is checked against its limit and against the bytes left before anything is
/// allocated for it.
fn read_record(bytes: &[u8]) -> Result<(SignedRecord, usize), WireError> {
    let mut r = Cursor { bytes, pos: 0 };
    let id = NodeId(r.array("id")?);
    let version = u64::from_be_bytes(r.array("version")?);
    let addr_len = u32::from_be_bytes(r.array("addr length")?);
    if addr_len as usize > MAX_ADDR_LEN {
        return Err(WireError::AddrTooLong(addr_len));
    }
    let addr = std::str::from_utf8(r.take(addr_len as usize, "addr")?)
        .map_err(|_| WireError::AddrNotUtf8)?
        .to_owned();
    let count = u32::from_be_bytes(r.array("neighbor count")?);
    if count as usize > MAX_NEIGHBORS {
        return Err(WireError::TooManyNeighbors(count));
    }
    let ids = r.take(32 * count as usize, "neighbors")?;
    let mut neighbors = Vec::with_capacity(count as usize);
    for chunk in ids.chunks_exact(32) {
        let mut id = [0u8; 32];
        id.copy_from_slice(chunk);
        let id = NodeId(id);
        if neighbors.last().is_some_and(|last| *last >= id) {
            return Err(WireError::NeighborsUnordered);
        }
        neighbors.push(id);
    }
    let signature = r.array("signature")?;
    let record = NodeRecord {
        id,
        addr,
        version,
        neighbors: neighbors.into_iter().collect(),
    };
    Ok((SignedRecord { record, signature }, r.pos))
}

/// The id and length of the record at the start of `bytes`, read from its head alone: for a
/// reader that looks for one node's record among many. Checks bounds only; decode the record
/// to check the rest.
pub fn peek_record(bytes: &[u8]) -> Result<(NodeId, usize), WireError> {
    let mut r = Cursor { bytes, pos: 0 };
    let id = NodeId(r.array("id")?);
    r.take(8, "version")?;
    let addr_len = u32::from_be_bytes(r.array("addr length")?);
    if addr_len as usize > MAX_ADDR_LEN {
        return Err(WireError::AddrTooLong(addr_len));
    }
    r.take(addr_len as usize, "addr")?;
    let count = u32::from_be_bytes(r.array("neighbor count")?);
    if count as usize > MAX_NEIGHBORS {
        return Err(WireError::TooManyNeighbors(count));
    }
    r.take(32 * count as usize, "neighbors")?;
    r.take(SIGNATURE_LEN, "signature")?;
    Ok((id, r.pos))
}

/// Reads fields off the front of a byte slice, never past its end.
pub(crate) struct Cursor<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let rest = &self.bytes[self.pos..];
        if rest.len() < n {
            return Err(WireError::Truncated(what));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }
}

/// A record whose signature and shape have been checked, with the wire bytes that were checked.
/// Only [`WireRecord::into_verified`] (and so [`SignedRecord::into_verified`] and
/// [`Identity::sign_verified`]) makes one, so a database that takes only these can never store
/// an unsigned change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord(WireRecord);

/// Its JSON, for people and UIs (never on the neighbor wire), is the signed record's.
impl Serialize for VerifiedRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.signed.serialize(s)
    }
}

impl VerifiedRecord {
    pub fn signed(&self) -> &SignedRecord {
        &self.0.signed
    }

    pub fn record(&self) -> &NodeRecord {
        &self.0.signed.record
    }

    /// The record's bytes on the wire, as verified: a frame that carries it copies these.
    pub fn wire(&self) -> &Bytes {
        &self.0.wire
    }

    pub fn id(&self) -> NodeId {
        self.0.signed.record.id
    }

    pub fn version(&self) -> u64 {
        self.0.signed.record.version
    }

    pub fn into_signed(self) -> SignedRecord {
        self.0.signed
    }
}

mod sig_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(sig))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(s.as_ref(), &mut out)
            .map_err(|_| serde::de::Error::custom("signature must be 128 hex digits"))?;
        Ok(out)
    }
}

/// Remembers records that verified, so that the copies of one record that arrive from several
/// neighbors cost one signature check. It keys each record by a hash of its wire bytes (its whole
/// signed content and signature) under a per-cache random key, so a record that differs in any byte, or a
/// forgery crafted to collide, is checked in full.
#[derive(Debug)]
pub struct VerifyCache {
    seen: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    hasher: RandomState,
    capacity: usize,
}

impl VerifyCache {
    /// A cache of the last `capacity` records that verified.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
            hasher: RandomState::new(),
            capacity,
        }
    }

    /// [`WireRecord::into_verified`], skipping the signature check for a record seen before.
    pub fn verify(&self, record: impl Into<WireRecord>) -> Result<VerifiedRecord, RecordError> {
        let record = record.into();
        let key = self.hasher.hash_one(&record.wire);
        if self.lock().0.contains(&key) {
            return Ok(VerifiedRecord(record));
        }
        let verified = record.into_verified()?;
        let mut seen = self.lock();
        if seen.0.insert(key) {
            seen.1.push_back(key);
            if seen.1.len() > self.capacity {
                if let Some(old) = seen.1.pop_front() {
                    seen.0.remove(&old);
                }
            }
        }
        Ok(verified)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashSet<u64>, VecDeque<u64>)> {
        // Nothing under this lock can panic; a poisoned cache is still a sound cache.
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A node's key pair. Only the owner of an identity can sign its records.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.id().short())
    }
}

impl Identity {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, RecordError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| RecordError::NoRandomness(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Parses the 64-hex-digit secret seed written by [`Identity::to_secret_hex`].
    pub fn from_secret_hex(text: &str) -> Result<Self, RecordError> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| RecordError::BadSecret)?;
        Ok(Self::from_seed(seed))
    }

    pub fn to_secret_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// Signs arbitrary bytes with this node's key. The link handshake uses it for the proof
    /// that binds a Noise static key to the node id; callers prefix a domain of their own.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    pub fn id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// Signs a record. The record's id should be this identity's, or nobody will accept it.
    pub fn sign(&self, record: NodeRecord) -> SignedRecord {
        let signature = self.key.sign(&record.signing_bytes()).to_bytes();
        SignedRecord { record, signature }
    }

    /// Signs a record of this identity's own, checking it as any receiver would.
    pub fn sign_verified(&self, record: NodeRecord) -> Result<VerifiedRecord, RecordError> {
        self.sign(record).into_verified()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The record pinned byte for byte here and in docs/protocol.md.
    pub(crate) fn golden() -> SignedRecord {
        let me = Identity::from_seed([1; 32]);
        me.sign(NodeRecord {
            id: me.id(),
            addr: "127.0.0.1:4000".into(),
            version: 7,
            neighbors: BTreeSet::from([Identity::from_seed([2; 32]).id()]),
        })
    }

    pub(crate) const GOLDEN_RECORD_HEX: &str = concat!(
        "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c", // id
        "0000000000000007",                                                 // version
        "0000000e",                                                         // len(addr)
        "3132372e302e302e313a34303030",                                     // addr
        "00000001",                                                         // len(neighbors)
        "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394", // neighbor
        "b8510a253d05bb7cfa2697caac5db09db4bcfcb49e40916118fbc8b4377b0e6f", // signature
        "b9e451b96d66b1b78aa73a3718dd75acbce21ad647924174522f72f1717e1701",
    );

    #[test]
    fn a_record_on_the_wire_is_byte_for_byte_as_documented() {
        let record = golden();
        let wire = record.to_wire();
        assert_eq!(wire.len(), 158);
        assert_eq!(hex::encode(&wire), GOLDEN_RECORD_HEX);
        assert_eq!(SignedRecord::from_wire(&wire), Ok(record.clone()));
        // The signature covers the domain tag and exactly the bytes before it.
        let mut signed = SIGNING_DOMAIN.to_vec();
        signed.extend_from_slice(&wire[..wire.len() - 64]);
        assert_eq!(signed, record.record.signing_bytes());
        assert_eq!(&wire[wire.len() - 64..], &record.signature[..]);
    }

    #[test]
    fn a_record_is_112_bytes_plus_its_addr_plus_32_per_neighbor() {
        let me = Identity::from_seed([5; 32]);
        for (addr, d) in [("", 0usize), ("127.0.0.1:4000", 4), ("[::1]:9", 1000)] {
            let neighbors = (0..d)
                .map(|i| {
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    NodeId(id)
                })
                .collect();
            let record = me.sign(NodeRecord {
                id: me.id(),
                addr: addr.into(),
                version: 1,
                neighbors,
            });
            let len = 112 + addr.len() + 32 * d;
            assert_eq!(record.to_wire().len(), len);
            assert_eq!(record.wire_len(), len);
            assert_eq!(wire_len(addr.len(), d), len);
        }
        assert_eq!(wire_len(14, 4), 254);
        assert_eq!(wire_len(14, 1000), 32_126);
    }

    #[test]
    fn malformed_records_are_refused_not_trusted() {
        let wire = golden().to_wire().to_vec();
        let addr_len_at = 32 + 8;
        let count_at = addr_len_at + 4 + 14;
        let with = |at: usize, bytes: &[u8]| {
            let mut w = wire.clone();
            w[at..at + bytes.len()].copy_from_slice(bytes);
            w
        };
        let mut two_same = wire[..count_at].to_vec();
        two_same.extend_from_slice(&2u32.to_be_bytes());
        let neighbor = Identity::from_seed([2; 32]).id();
        two_same.extend_from_slice(&neighbor.0);
        two_same.extend_from_slice(&neighbor.0);
        two_same.extend_from_slice(&[0; 64]);
        let mut descending = wire[..count_at].to_vec();
        descending.extend_from_slice(&2u32.to_be_bytes());
        descending.extend_from_slice(&[9; 32]);
        descending.extend_from_slice(&[8; 32]);
        descending.extend_from_slice(&[0; 64]);
        let mut trailing = wire.clone();
        trailing.push(0);
        for (what, bytes, error) in [
            ("empty", Vec::new(), WireError::Truncated("id")),
            (
                "cut in the signature",
                wire[..wire.len() - 1].to_vec(),
                WireError::Truncated("signature"),
            ),
            ("a byte after", trailing, WireError::Trailing(1)),
            (
                "addr over the limit",
                with(addr_len_at, &256u32.to_be_bytes()),
                WireError::AddrTooLong(256),
            ),
            (
                "addr longer than the bytes",
                with(addr_len_at, &255u32.to_be_bytes()),
                WireError::Truncated("addr"),
            ),
            (
                "addr not UTF-8",
                with(addr_len_at + 4, &[0xff]),
                WireError::AddrNotUtf8,
            ),
            (
                "count over the limit",
                with(count_at, &8193u32.to_be_bytes()),
                WireError::TooManyNeighbors(8193),
            ),
            (
                "count over the bytes",
                with(count_at, &8192u32.to_be_bytes()),
                WireError::Truncated("neighbors"),
            ),
            ("a neighbor twice", two_same, WireError::NeighborsUnordered),
            (
                "neighbors descending",
                descending,
                WireError::NeighborsUnordered,
            ),
        ] {
            assert_eq!(SignedRecord::from_wire(&bytes), Err(error), "{what}");
            assert!(WireRecord::decode(&bytes).is_err(), "{what}");
        }
    }

    #[test]
    fn a_received_record_is_verified_over_its_bytes_and_keeps_them() {
        let wire = golden().to_wire();
        let received = WireRecord::decode(&wire).expect("decodes");
        assert_eq!(received.wire(), &wire);
        let verified = received.into_verified().expect("verifies");
        assert_eq!(verified.wire(), &wire);
        assert_eq!(verified.signed(), &golden());
        // A changed version: well formed, but the signature no longer covers it.
        let mut tampered = wire.to_vec();
        tampered[32 + 7] ^= 1;
        let tampered = WireRecord::decode(&tampered).expect("well formed");
        assert!(matches!(
            tampered.into_verified(),
            Err(RecordError::BadSignature(_))
        ));
    }

    fn record(identity: &Identity, version: u64) -> NodeRecord {
        NodeRecord {
            id: identity.id(),
            addr: "127.0.0.1:4000".into(),
            version,
            neighbors: BTreeSet::new(),
        }
    }

    #[test]
    fn a_signed_record_verifies_and_round_trips_through_json() {
        let me = Identity::from_seed([7; 32]);
        let mut rec = record(&me, 3);
        rec.neighbors.insert(Identity::from_seed([8; 32]).id());
        let signed = me.sign(rec);
        assert_eq!(signed.verify(), Ok(()));
        let json = serde_json::to_string(&signed).expect("serializes");
        assert!(json.contains("\"version\":3"), "{json}");
        let back: SignedRecord = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, signed);
        assert_eq!(back.verify(), Ok(()));
    }

    #[test]
    fn tampering_or_signing_for_another_id_fails_verification() {
        let me = Identity::from_seed([1; 32]);
        let other = Identity::from_seed([2; 32]);
        let mut signed = me.sign(record(&me, 1));
        signed.record.version = 2;
        assert_eq!(signed.verify(), Err(RecordError::BadSignature(me.id())));

        let forged = other.sign(record(&me, 9));
        assert_eq!(forged.verify(), Err(RecordError::BadSignature(me.id())));
    }

    #[test]
    fn a_record_listing_itself_is_malformed() {
        let me = Identity::from_seed([3; 32]);
        let mut rec = record(&me, 1);
        rec.neighbors.insert(me.id());
        assert!(matches!(
            me.sign(rec).verify(),
            Err(RecordError::Malformed(..))
        ));
    }

    #[test]
    fn the_verify_cache_checks_anything_it_has_not_seen_verify() {
        let me = Identity::from_seed([4; 32]);
        let cache = VerifyCache::new(2);
        let good = me.sign(record(&me, 1));
        assert!(cache.verify(good.clone()).is_ok());
        assert!(cache.verify(good.clone()).is_ok(), "a copy passes");
        let mut tampered = good.clone();
        tampered.record.version = 2;
        assert!(
            cache.verify(tampered).is_err(),
            "a change of content is checked in full"
        );
        let mut resigned = good;
        resigned.signature[0] ^= 1;
        assert!(cache.verify(resigned).is_err());
    }

    #[test]
    fn ids_and_secrets_parse_only_from_exact_hex() {
        let me = Identity::generate().expect("randomness");
        let id: NodeId = me.id().to_string().parse().expect("parses");
        assert_eq!(id, me.id());
        assert_eq!("abc".parse::<NodeId>(), Err(RecordError::BadId));
        let again = Identity::from_secret_hex(&format!("{}\n", me.to_secret_hex())).expect("ok");
        assert_eq!(again.id(), me.id());
        assert!(Identity::from_secret_hex("zz").is_err());
    }
}
