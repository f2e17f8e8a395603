//! Tests of the hardening patches (see PATCHES.md): peer input that used to trip an `assert!`
//! or grow without bound is now rejected or bounded.

use std::collections::HashSet;

use tokio::sync::watch;

use crate::delta::{Delta, DeltaSerializer};
use crate::digest::Digest;
use crate::limits::{MAX_DIGEST_LEN, MAX_KNOWN_NODES, MAX_NODES_PER_MESSAGE};
use crate::message::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use crate::serialize::{Deserializable, Serializable};
use crate::{Chitchat, ChitchatConfig, ChitchatId, Heartbeat};

fn chitchat() -> Chitchat {
    let (_tx, seeds) = watch::channel(HashSet::new());
    Chitchat::with_chitchat_id_and_seeds(ChitchatConfig::for_test(10_001), seeds, Vec::new())
}

/// One node op for `node`, a key-value at version 100, then `SetMaxVersion(max_version)`.
fn delta_bytes(node: &ChitchatId, max_version: u64) -> Vec<u8> {
    let mut ops = vec![0u8];
    node.serialize(&mut ops);
    0u64.serialize(&mut ops);
    0u64.serialize(&mut ops);
    ops.push(1);
    "key".serialize(&mut ops);
    "value".serialize(&mut ops);
    100u64.serialize(&mut ops);
    ops.push(0);
    ops.push(2);
    max_version.serialize(&mut ops);
    let mut buf = vec![2u8];
    (ops.len() as u16).serialize(&mut buf);
    buf.extend_from_slice(&ops);
    buf.push(0);
    buf
}

#[test]
fn a_set_max_version_below_a_key_version_is_rejected() {
    let node = ChitchatId::for_local_test(20_000);
    assert!(Delta::deserialize(&mut &delta_bytes(&node, 5)[..]).is_err());
    let delta = Delta::deserialize(&mut &delta_bytes(&node, 100)[..]).unwrap();
    assert_eq!(delta.node_deltas[0].max_version, 100);
}

#[test]
fn a_delta_with_a_low_max_version_does_not_panic_the_state() {
    // Built directly (bypassing the deserializer's check): the state keeps its max version.
    let mut chitchat = chitchat();
    let node = ChitchatId::for_local_test(20_000);
    let mut digest = Digest::default();
    digest.add_node(node.clone(), Heartbeat(5), 0, 0);
    let mut delta = Delta::default();
    delta.add_node(node.clone(), 0, 0);
    delta.add_kv(&node, "key", "value", 100, false);
    delta.node_deltas[0].max_version = 5;
    chitchat.process_message(ChitchatMessage::SynAck { digest, delta });
    assert_eq!(chitchat.node_state(&node).unwrap().max_version(), 100);
}

#[test]
fn a_tiny_mtu_gives_an_empty_delta() {
    for mtu in [0, 1, 99] {
        let mut serializer = DeltaSerializer::with_mtu(mtu);
        assert!(!serializer.try_add_node(ChitchatId::for_local_test(1), 0, 0));
        assert_eq!(serializer.finish(), Delta::default());
    }
}

#[test]
fn digests_naming_too_many_nodes_are_rejected() {
    let digest = Digest::sample_for_test(MAX_NODES_PER_MESSAGE as u16 + 1);
    for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
        let envelope = ChitchatEnvelope {
            version,
            message: ChitchatMessage::Syn {
                cluster_id: "c".to_string(),
                digest: Digest::sample_for_test(10),
            },
        };
        assert!(ChitchatEnvelope::deserialize(&mut &envelope.serialize_to_vec()[..]).is_ok());
        let mut buf = Vec::new();
        digest.serialize(version, &mut buf);
        assert!(Digest::deserialize(version, &mut &buf[..]).is_err(), "{version:?}");
    }
}

#[test]
fn a_decompression_bomb_is_rejected() {
    // Many tiny compressed blocks, each inflating to 64 KiB of zeros.
    let zeros = vec![0u8; u16::MAX as usize];
    let block = zstd::bulk::compress(&zeros, 19).unwrap();
    let mut buf = Vec::new();
    for _ in 0..200 {
        buf.push(1u8);
        (block.len() as u16).serialize(&mut buf);
        buf.extend_from_slice(&block);
    }
    buf.push(0);
    assert!(Delta::deserialize(&mut &buf[..]).is_err());
}

#[test]
fn fake_nodes_are_bounded_and_the_digest_fits_a_datagram() {
    let mut chitchat = chitchat();
    // Syns naming 6 x 2,000 fake nodes (with long ids): more than the known-node bound and far
    // more than a datagram's worth of digest.
    for round in 0..6u16 {
        let mut digest = Digest::default();
        for i in 0..2_000u16 {
            let id = ChitchatId::new(
                format!("fake-node-with-a-rather-long-name-{round}-{i}"),
                1,
                ([127, 0, 0, 1], i).into(),
            );
            digest.add_node(id, Heartbeat(7), 0, 0);
        }
        let syn = ChitchatMessage::Syn {
            cluster_id: "default-cluster".to_string(),
            digest,
        };
        let reply = chitchat.process_message(syn);
        assert!(matches!(reply, Some(ChitchatMessage::SynAck { .. })));
    }
    assert!(chitchat.node_states().len() <= MAX_KNOWN_NODES);
    let ChitchatMessage::Syn { digest, .. } = chitchat.create_syn_message() else {
        panic!("not a syn");
    };
    assert!(digest.serialized_len(ProtocolVersion::V0) <= MAX_DIGEST_LEN);
    assert!(digest.node_digests.contains_key(chitchat.self_chitchat_id()));
    // A real peer's Syn is still answered (used to panic on `assert!(mtu >= 100)`).
    let syn = ChitchatMessage::Syn {
        cluster_id: "default-cluster".to_string(),
        digest: Digest::default(),
    };
    let Some(ChitchatMessage::SynAck { digest, .. }) = chitchat.process_message(syn) else {
        panic!("no syn-ack");
    };
    let envelope = ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::SynAck {
            digest,
            delta: Delta::default(),
        },
    };
    assert!(envelope.serialize_to_vec().len() <= crate::MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
}
