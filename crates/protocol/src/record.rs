//! Node identities and the signed records that gossip carries.
//!
//! A node's id is its Ed25519 public key. Its record lists the address it accepts neighbors on
//! and the ids of its neighbors (A listing B is the half-neighborship A->B), with a version
//! that only the owner raises, all signed by the owner over a fixed byte layout
//! ([`NodeRecord::signing_bytes`]).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::str::FromStr;
use std::sync::Mutex;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest `addr` a record may carry, in bytes.
pub const MAX_ADDR_LEN: usize = 255;
/// Most neighbors a record may list.
pub const MAX_NEIGHBORS: usize = 8_192;
const SIGNING_DOMAIN: &[u8] = b"meshnode-record-v1\0";

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
        let mut out = Vec::with_capacity(
            SIGNING_DOMAIN.len() + 48 + self.addr.len() + 32 * self.neighbors.len(),
        );
        out.extend_from_slice(SIGNING_DOMAIN);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&len_u32(self.addr.len()).to_be_bytes());
        out.extend_from_slice(self.addr.as_bytes());
        out.extend_from_slice(&len_u32(self.neighbors.len()).to_be_bytes());
        for n in &self.neighbors {
            out.extend_from_slice(&n.0);
        }
        out
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
        self.verify()?;
        Ok(VerifiedRecord(self))
    }

    pub fn id(&self) -> NodeId {
        self.record.id
    }

    pub fn version(&self) -> u64 {
        self.record.version
    }
}

/// A record whose signature and shape have been checked. Only [`SignedRecord::into_verified`]
/// and [`Identity::sign_verified`] make one, so a database that takes only these can never
/// store an unsigned change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct VerifiedRecord(SignedRecord);

impl VerifiedRecord {
    pub fn signed(&self) -> &SignedRecord {
        &self.0
    }

    pub fn record(&self) -> &NodeRecord {
        &self.0.record
    }

    pub fn id(&self) -> NodeId {
        self.0.record.id
    }

    pub fn version(&self) -> u64 {
        self.0.record.version
    }

    pub fn into_signed(self) -> SignedRecord {
        self.0
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
/// neighbors cost one signature check. It keys each record by a hash of its whole signed content
/// and signature under a per-cache random key, so a record that differs in any byte, or a
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

    /// [`SignedRecord::into_verified`], skipping the signature check for a record seen before.
    pub fn verify(&self, record: SignedRecord) -> Result<VerifiedRecord, RecordError> {
        let key = {
            let mut h = self.hasher.build_hasher();
            record.record.signing_bytes().hash(&mut h);
            record.signature.hash(&mut h);
            h.finish()
        };
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
mod tests {
    use super::*;

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
