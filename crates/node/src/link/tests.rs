//! The handshake and the encrypted transport, both ends run over in-memory pipes.

use std::time::Duration;

use bytes::Bytes;
use meshnode_protocol::{Inbound, MAX_FRAME_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::FramedRead;

use super::handshake::{HandshakeError, LocalLink, Negotiated, common_version, handshake};
use super::transport::{LinkCodec, LinkWriter, MAX_PLAINTEXT, next_inbound};
use crate::test_support::{identity, within};

type End = (
    Negotiated,
    FramedRead<ReadHalf<DuplexStream>, LinkCodec>,
    LinkWriter<WriteHalf<DuplexStream>>,
);

fn local(seed: u8, versions: (u16, u16)) -> LocalLink {
    let mut link = LocalLink::new(identity(seed), Duration::from_secs(15)).expect("a Noise key");
    link.versions = versions;
    link
}

/// Runs both sides of one handshake: `a` dials `b`.
async fn pair(
    a: &LocalLink,
    b: &LocalLink,
) -> (Result<End, HandshakeError>, Result<End, HandshakeError>) {
    let (x, y) = tokio::io::duplex(64 * 1024);
    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    within(
        "both sides of the handshake",
        futures::future::join(handshake(xr, xw, true, a), handshake(yr, yw, false, b)),
    )
    .await
}

#[tokio::test]
async fn both_sides_learn_the_proven_id_and_the_highest_common_version_either_way() {
    for (dialer, listener, version) in [
        ((2, 3), (1, 2), 2),
        ((1, 2), (2, 3), 2),
        ((2, 5), (3, 9), 5),
    ] {
        let (a, b) = (local(1, dialer), local(2, listener));
        let (ra, rb) = pair(&a, &b).await;
        let (na, _, _) = ra.expect("the dialer's side succeeds");
        let (nb, _, _) = rb.expect("the listener's side succeeds");
        assert_eq!((na.peer, nb.peer), (b.id(), a.id()));
        assert_eq!(
            (na.version, nb.version),
            (version, version),
            "{dialer:?} {listener:?}"
        );
        assert_eq!((na.peer_versions, nb.peer_versions), (listener, dialer));
        assert_eq!(na.peer_is_newer(), listener.1 > version);
        assert_eq!(nb.peer_is_newer(), dialer.1 > version);
        assert_eq!(na.keepalive_interval(), Duration::from_secs(5));
    }
}

#[tokio::test]
async fn no_common_version_fails_on_both_sides_with_both_ranges_in_the_reason() {
    let (old, new) = (local(1, (1, 2)), local(2, (3, 4)));
    for (a, b) in [(&old, &new), (&new, &old)] {
        let (ra, rb) = pair(a, b).await;
        for (result, ours, theirs) in [(ra, a.versions, b.versions), (rb, b.versions, a.versions)] {
            let error = result.expect_err("refused");
            assert!(
                matches!(error, HandshakeError::NoCommonVersion { ours: o, theirs: t } if o == ours && t == theirs),
                "{error:?}"
            );
            let text = error.to_string();
            let expected = format!(
                "peer speaks {}..{}, we speak {}..{}",
                theirs.0, theirs.1, ours.0, ours.1
            );
            assert!(text.contains(&expected), "{text}");
        }
    }
    assert_eq!(common_version((1, 2), (2, 7)).ok(), Some(2));
}

#[tokio::test]
async fn a_peer_claiming_the_receivers_own_id_is_refused() {
    // Two processes with one key: each sees its own id on the other end.
    let (a, b) = (local(1, (2, 2)), local(1, (2, 2)));
    let (ra, rb) = pair(&a, &b).await;
    assert!(matches!(ra, Err(HandshakeError::OwnId)), "{:?}", ra.err());
    // The listener never hears message 3: the dialer refused before sending it.
    assert!(rb.is_err());
}

#[tokio::test]
async fn a_proof_made_for_another_handshake_or_another_key_does_not_verify() {
    let a = local(1, (2, 2));
    let (hash, other_hash) = ([7u8; 32], [8u8; 32]);
    let payload = a.payload(&hash);
    let key = a.noise_public();
    let ok = super::handshake::check_payload(&payload, &key, &hash).expect("its own proof");
    assert_eq!(ok.id, a.id());
    let replayed = super::handshake::check_payload(&payload, &key, &other_hash);
    assert!(matches!(replayed, Err(HandshakeError::BadProof)));
    let stolen = super::handshake::check_payload(&payload, &[9u8; 32], &hash);
    assert!(matches!(stolen, Err(HandshakeError::BadProof)));
    let mut tampered = payload.clone();
    tampered[3] ^= 1;
    let downgraded = super::handshake::check_payload(&tampered, &key, &hash);
    assert!(matches!(downgraded, Err(HandshakeError::BadProof)));
    let short = super::handshake::check_payload(&payload[..50], &key, &hash);
    assert!(matches!(short, Err(HandshakeError::BadPayload(_))));
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_fails_without_a_panic() {
    let b = local(2, (2, 2));
    for wire in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff, 0xff][..],
        &[0, 32, 1, 2, 3][..],
    ] {
        let (mut x, y) = tokio::io::duplex(1024);
        x.write_all(wire).await.expect("written");
        x.shutdown().await.expect("shut");
        let (yr, yw) = tokio::io::split(y);
        let result = within("the handshake fails", handshake(yr, yw, false, &b)).await;
        assert!(result.is_err(), "{wire:?}");
    }
}

#[tokio::test]
async fn frames_larger_than_a_message_are_split_and_reassembled_and_keepalives_show_life() {
    let (a, b) = (local(1, (2, 2)), local(2, (2, 2)));
    let (ra, rb) = pair(&a, &b).await;
    let (_, _, mut writer) = ra.expect("dialer");
    let (_, mut reader, _) = rb.expect("listener");
    let big: Vec<u8> = (0..MAX_FRAME_LEN).map(|i| (i % 251) as u8).collect();
    let small = b"{\"type\":\"gossip\",\"records\":[]}".to_vec();
    let send = async {
        writer.send_frame(&small).await.expect("sent");
        writer.keepalive().await.expect("sent");
        writer.send_frame(&big).await.expect("sent");
        writer.send_frame(&small).await.expect("sent");
        writer.shutdown().await.expect("shut");
    };
    let receive = async {
        let mut items = Vec::new();
        use futures::StreamExt;
        while let Some(item) = reader.next().await {
            items.push(item.expect("decrypts"));
        }
        items
    };
    let ((), items) = within("the frames cross", futures::future::join(send, receive)).await;
    use super::transport::LinkItem;
    let frames: Vec<&Inbound> = items
        .iter()
        .filter_map(|i| match i {
            LinkItem::Inbound(inbound) => Some(inbound),
            LinkItem::Progress => None,
        })
        .collect();
    assert_eq!(
        frames,
        vec![
            &Inbound::Frame(Bytes::from(small.clone())),
            &Inbound::Frame(Bytes::from(big.clone())),
            &Inbound::Frame(Bytes::from(small)),
        ]
    );
    // The keepalive, and every message of the big frame but its last, show up as progress.
    let pieces = (big.len() + 4).div_ceil(MAX_PLAINTEXT);
    let progress = items.iter().filter(|i| **i == LinkItem::Progress).count();
    assert_eq!(progress, 1 + pieces - 1);
}

#[tokio::test]
async fn a_changed_byte_ends_the_link_with_an_error() {
    let (a, b) = (local(1, (2, 2)), local(2, (2, 2)));
    // A relay that flips one bit of the first transport message from A.
    let (x, relay_a) = tokio::io::duplex(64 * 1024);
    let (relay_b, y) = tokio::io::duplex(64 * 1024);
    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    let relay = tokio::spawn(async move {
        let (mut ar, mut aw) = tokio::io::split(relay_a);
        let (mut br, mut bw) = tokio::io::split(relay_b);
        let to_a = async move {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
        };
        let to_b = async move {
            // Messages 1 and 3 of the handshake are 2 + 32 and 2 + 172 bytes.
            for len in [2 + 32, 2 + 172] {
                let mut message = vec![0u8; len];
                ar.read_exact(&mut message).await.expect("the handshake");
                bw.write_all(&message).await.expect("relayed");
            }
            let mut rest = Vec::new();
            let _ = ar.read_to_end(&mut rest).await;
            rest[10] ^= 0x01;
            let _ = bw.write_all(&rest).await;
            let _ = bw.shutdown().await;
        };
        futures::future::join(to_a, to_b).await;
    });
    let (ra, rb) = within(
        "the handshake through the relay",
        futures::future::join(handshake(xr, xw, true, &a), handshake(yr, yw, false, &b)),
    )
    .await;
    let (_, _, mut writer) = ra.expect("dialer");
    let (_, mut reader, _) = rb.expect("listener");
    writer
        .send_frame(b"{\"type\":\"gossip\",\"records\":[]}")
        .await
        .expect("sent");
    writer.shutdown().await.expect("shut");
    let item = within("the relayed frame", next_inbound(&mut reader)).await;
    assert!(matches!(item, Some(Err(_))), "{item:?}");
    drop(writer);
    relay.abort();
}
