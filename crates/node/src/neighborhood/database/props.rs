//! Properties of the merge, over records from a few owners at a few versions with a few
//! contents each, so that two different records at one version are common: the database is a
//! join (the order and the repetition of merges do not matter), a stored record never goes
//! back, and nothing but its owner's signature changes a record.
//!
//! `PROPTEST_CASES` sets how many cases each property runs (by default 256, and 32 for the
//! forgeries, whose every check is a full signature check: slow in an unoptimized build).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use meshnode_protocol::{Identity, NodeId, NodeRecord, SignedRecord, VerifyCache};
use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::neighborhood::props_support::{cases, identities};

const OWNERS: usize = 3;
const VERSIONS: u64 = 4;
const ADDRS: u8 = 3;

fn owners() -> &'static [Identity] {
    static OWNERS_: OnceLock<Vec<Identity>> = OnceLock::new();
    OWNERS_.get_or_init(|| identities(OWNERS))
}

/// Every record the owners sign in these tests, signed once (signing is slow unoptimized):
/// each owner at each version with each address and each set of the other owners as neighbors.
fn pool() -> &'static [VerifiedRecord] {
    static POOL: OnceLock<Vec<VerifiedRecord>> = OnceLock::new();
    POOL.get_or_init(|| {
        let owners = owners();
        let mut pool = Vec::new();
        for (i, owner) in owners.iter().enumerate() {
            let others: Vec<NodeId> = owners
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, o)| o.id())
                .collect();
            for version in 0..VERSIONS {
                for addr in 0..ADDRS {
                    for mask in 0..1u32 << others.len() {
                        let neighbors = others
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| mask & (1 << k) != 0)
                            .map(|(_, id)| *id)
                            .collect();
                        let record = NodeRecord {
                            id: owner.id(),
                            addr: format!("10.0.0.{addr}:4000"),
                            version,
                            neighbors,
                        };
                        pool.push(owner.sign_verified(record).expect("own record verifies"));
                    }
                }
            }
        }
        pool
    })
}

fn record() -> impl Strategy<Value = VerifiedRecord> {
    (0..pool().len()).prop_map(|i| pool()[i].clone())
}

fn merged(records: impl IntoIterator<Item = VerifiedRecord>) -> NodeDb {
    let mut db = NodeDb::new();
    for record in records {
        db.merge(record);
    }
    db
}

fn contents(db: &NodeDb) -> Vec<VerifiedRecord> {
    db.records().cloned().collect()
}

/// Records, and the same records again in another order with some of them repeated.
fn records_and_a_reordering_with_repeats()
-> impl Strategy<Value = (Vec<VerifiedRecord>, Vec<VerifiedRecord>)> {
    (
        prop::collection::vec(record(), 0..24),
        prop::collection::vec(any::<Index>(), 0..12),
    )
        .prop_flat_map(|(records, repeats)| {
            let mut again = records.clone();
            if !records.is_empty() {
                again.extend(
                    repeats
                        .iter()
                        .map(|i| records[i.index(records.len())].clone()),
                );
            }
            (Just(records), Just(again).prop_shuffle())
        })
}

/// Ways to change a signed record without its owner.
#[derive(Debug, Clone)]
enum Forgery {
    /// Raise or lower the version.
    Version(u64),
    /// Change the address.
    Addr(char),
    /// Add or drop a neighbor (one of the owners, itself included, or a stranger).
    ToggleNeighbor(usize),
    /// Claim the record for another owner, keeping the signature.
    OtherId(usize),
    /// Claim it for an id that may not even be a key.
    AnyId([u8; 32]),
    /// Flip one bit of the signature.
    FlipBit(usize, u8),
    /// Take the signature of another record of the pool.
    SignatureOf(usize),
    /// Sign the record, id unchanged, with another owner's key.
    SignedByOther(usize, u64),
    /// Sign it with a key of one's own.
    SignedByStranger([u8; 32], u64),
    ZeroSignature,
}

fn forgery() -> impl Strategy<Value = Forgery> {
    prop_oneof![
        (1..u64::MAX).prop_map(Forgery::Version),
        any::<char>().prop_map(Forgery::Addr),
        (0..=OWNERS).prop_map(Forgery::ToggleNeighbor),
        (1..OWNERS).prop_map(Forgery::OtherId),
        any::<[u8; 32]>().prop_map(Forgery::AnyId),
        (0..64usize, 0..8u8).prop_map(|(byte, bit)| Forgery::FlipBit(byte, bit)),
        (0..pool().len()).prop_map(Forgery::SignatureOf),
        (1..OWNERS, 0..=VERSIONS).prop_map(|(o, v)| Forgery::SignedByOther(o, v)),
        (any::<[u8; 32]>(), 0..=VERSIONS).prop_map(|(k, v)| Forgery::SignedByStranger(k, v)),
        Just(Forgery::ZeroSignature),
    ]
}

/// `genuine` changed by `forgery`. Every forgery changes the signed content or the signature.
fn forge(genuine: &VerifiedRecord, forgery: &Forgery) -> SignedRecord {
    let owners = owners();
    let owner = owners
        .iter()
        .position(|o| o.id() == genuine.id())
        .expect("pool records are the owners'");
    let mut forged = genuine.signed().clone();
    let record = &mut forged.record;
    match forgery {
        Forgery::Version(delta) => record.version = record.version.wrapping_add(*delta),
        Forgery::Addr(c) => record.addr.push(*c),
        Forgery::ToggleNeighbor(i) => {
            let id = owners
                .get(*i)
                .map_or_else(|| Identity::from_seed([99; 32]).id(), Identity::id);
            if !record.neighbors.remove(&id) {
                record.neighbors.insert(id);
            }
        }
        Forgery::OtherId(k) => record.id = owners[(owner + k) % OWNERS].id(),
        Forgery::AnyId(bytes) => {
            record.id = NodeId(*bytes);
            if record.id == genuine.id() {
                record.id.0[0] ^= 1;
            }
        }
        Forgery::FlipBit(byte, bit) => forged.signature[*byte] ^= 1 << bit,
        Forgery::SignatureOf(i) => {
            let pool = pool();
            let donor = (0..pool.len())
                .map(|k| &pool[(i + k) % pool.len()])
                .find(|r| r.signed().signature != forged.signature)
                .expect("the pool has other records");
            forged.signature = donor.signed().signature;
        }
        Forgery::SignedByOther(k, version) => {
            record.version = *version;
            let other = &owners[(owner + k) % OWNERS];
            forged = other.sign(forged.record);
        }
        Forgery::SignedByStranger(seed, version) => {
            record.version = *version;
            forged = Identity::from_seed(*seed).sign(forged.record);
        }
        Forgery::ZeroSignature => forged.signature = [0; 64],
    }
    forged
}

proptest! {
    #[test]
    fn any_order_and_any_repetition_leave_the_same_database(
        (records, again) in records_and_a_reordering_with_repeats(),
    ) {
        let db = merged(records.iter().cloned());
        prop_assert_eq!(contents(&merged(again)), contents(&db));
        prop_assert_eq!(contents(&merged(records.iter().rev().cloned())), contents(&db));
        // Each id keeps the record that supersedes every other of its id that was merged.
        let mut best: BTreeMap<NodeId, &VerifiedRecord> = BTreeMap::new();
        for r in &records {
            let slot = best.entry(r.id()).or_insert(r);
            if supersedes(r, slot) {
                *slot = r;
            }
        }
        prop_assert_eq!(db.len(), best.len());
        for (id, r) in best {
            prop_assert_eq!(db.get(&id), Some(r));
            prop_assert!(records.iter().filter(|o| o.id() == id).all(|o| !supersedes(o, r)));
        }
    }

    #[test]
    fn a_stored_record_never_goes_back_and_accepted_means_changed(
        records in prop::collection::vec(record(), 0..32),
    ) {
        let mut db = NodeDb::new();
        for record in records {
            let id = record.id();
            let before = db.get(&id).cloned();
            let merge = db.merge(record.clone());
            let after = db.get(&id).cloned().expect("a merged id is stored");
            prop_assert_eq!(merge == Merge::Accepted, before.as_ref() != Some(&after));
            if let Some(before) = &before {
                prop_assert!(after.version() >= before.version());
                prop_assert!(&after == before || supersedes(&after, before));
            }
            prop_assert!(after == record || supersedes(&after, &record));
            prop_assert_eq!(db.merge(after), Merge::Stale, "a copy of the stored record is stale");
        }
    }
}

/// Genuine records, and forgeries made from records of the pool, shuffled together: a forgery
/// may arrive before, between or after genuine records, the one it was made from among them
/// (so the cache has often seen that one verify).
fn genuine_and_forged() -> impl Strategy<Value = (Vec<VerifiedRecord>, Vec<(bool, SignedRecord)>)> {
    (
        prop::collection::vec(record(), 0..12),
        prop::collection::vec((record(), forgery()), 0..8),
    )
        .prop_flat_map(|(good, forged)| {
            let mixed: Vec<(bool, SignedRecord)> = good
                .iter()
                .map(|r| (true, r.signed().clone()))
                .chain(forged.iter().map(|(r, f)| (false, forge(r, f))))
                .collect();
            (Just(good), Just(mixed).prop_shuffle())
        })
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn forged_records_never_verify_and_never_change_the_database(
        (good, mixed) in genuine_and_forged(),
    ) {
        let cache = VerifyCache::new(16);
        let mut db = NodeDb::new();
        for (genuine, signed) in mixed {
            match cache.verify(signed.clone()) {
                Ok(verified) => {
                    prop_assert!(genuine, "a forgery verified: {:?}", signed);
                    db.merge(verified);
                }
                Err(e) => prop_assert!(!genuine, "a genuine record failed: {}", e),
            }
        }
        prop_assert_eq!(contents(&db), contents(&merged(good)));
    }
}

#[test]
fn the_pool_has_distinct_records_at_equal_versions() {
    let pool = pool();
    let distinct: BTreeSet<[u8; 64]> = pool.iter().map(|r| r.signed().signature).collect();
    assert_eq!(distinct.len(), pool.len());
    assert_eq!(
        pool.len(),
        OWNERS * VERSIONS as usize * ADDRS as usize * (1 << (OWNERS - 1))
    );
}
