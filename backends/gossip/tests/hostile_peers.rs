//! Hostile peers against real nodes: crafted chitchat datagrams (a SynAck whose `SetMaxVersion`
//! is below its own key versions, thousands of fake node ids), replayed and stale authenticated
//! datagrams, and a rolling secret change. Each test talks to real chitchat over UDP on
//! 127.0.0.1 and then shows the mesh still gossips. Every wait is bounded in time and count.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::{Socket, Transport};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, ChitchatMessage,
    FailureDetectorConfig, ProtocolVersion,
};
use hivemind_core::{
    Clock, Enforcement, Hit, Limit, LocalCounters, SyncStrategy, SystemClock, Unit,
};
use hivemind_gossip::transport::{MeshSecret, MeshTransport, TransportOptions};
use hivemind_gossip::Gossip;

mod common;

use common::{config, INTERVAL};

/// How long to listen before concluding that nothing more arrives.
const QUIET: Duration = Duration::from_millis(400);

fn bind() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}

struct Node {
    gossip: Gossip,
    addr: SocketAddr,
}

async fn start_node(id: &str, seeds: &[String], secret: Option<&str>) -> Node {
    let socket = bind();
    let addr = socket.local_addr().unwrap();
    let config = config(id, &socket, seeds, secret);
    let gossip = Gossip::start(
        config,
        socket,
        Arc::new(LocalCounters::new(100_000)),
        Arc::new(SystemClock),
    )
    .await
    .expect("start gossip node");
    Node { gossip, addr }
}

/// Two nodes that see each other.
async fn pair(secret: Option<&str>) -> (Node, Node) {
    let a = start_node("node-a", &[], secret).await;
    let b = start_node("node-b", &[a.addr.to_string()], secret).await;
    for node in [&a, &b] {
        wait_for(Duration::from_secs(10), "the pair sees each other", || {
            node.gossip.membership().live.len() == 1
        })
        .await;
    }
    (a, b)
}

/// Polls `condition` every 20 ms until it holds, failing after `limit`.
async fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` hits on `key` at `node` (of a limit high enough never to refuse them), then waits until
/// `observer` counts them: gossip still flows from `node` to `observer`.
async fn counts_propagate(node: &Node, observer: &Node, key: &str, n: u32) {
    let hit = Hit {
        key: key.into(),
        limit: Limit {
            requests_per_unit: 2 * n,
            unit: Unit::Hour,
        },
        addend: 1,
        enforcement: Enforcement::Enforce,
    };
    for _ in 0..n {
        node.gossip
            .check(std::slice::from_ref(&hit), SystemClock.now())
            .await
            .unwrap();
    }
    wait_for(
        Duration::from_secs(10),
        &format!("the peer counts {n} hits on {key}"),
        || {
            observer
                .gossip
                .peer_count(key, Unit::Hour, SystemClock.now())
                == n
        },
    )
    .await;
}

/// Hand-written chitchat 0.13 wire encoding, as a hostile peer would write it (the well-formed
/// builders cannot express the malformed messages below).
mod wire {
    use std::net::SocketAddr;

    pub const MAGIC: u16 = 45_139;
    pub const SYN: u8 = 0;
    pub const SYN_ACK: u8 = 1;

    /// A mesh datagram without a secret: magic 0xA0, kind 0 (whole), message id.
    pub fn plain_frame(id: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xA0, 0];
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// Message header: magic, protocol version 0, message type.
    pub fn header(message_type: u8) -> Vec<u8> {
        let mut buf = MAGIC.to_le_bytes().to_vec();
        buf.push(0);
        buf.push(message_type);
        buf
    }

    pub fn str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    pub fn u64(buf: &mut Vec<u8>, v: u64) {
        buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn chitchat_id(buf: &mut Vec<u8>, node_id: &str, generation: u64, addr: SocketAddr) {
        str(buf, node_id);
        u64(buf, generation);
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        buf.push(4);
        buf.extend_from_slice(&v4.ip().octets());
        buf.extend_from_slice(&v4.port().to_le_bytes());
    }

    /// A V0 digest of `(node id, heartbeat, max_version)`, all on `addr`, generation 1.
    pub fn digest(buf: &mut Vec<u8>, nodes: &[(String, u64, u64)], addr: SocketAddr) {
        buf.extend_from_slice(&(nodes.len() as u16).to_le_bytes());
        for (node_id, heartbeat, max_version) in nodes {
            chitchat_id(buf, node_id, 1, addr);
            u64(buf, *heartbeat);
            u64(buf, 0); // last_gc_version
            u64(buf, *max_version);
        }
    }

    /// A delta stream made of one uncompressed block holding `ops`, then the end marker.
    pub fn delta(buf: &mut Vec<u8>, ops: &[u8]) {
        buf.push(2); // uncompressed block
        buf.extend_from_slice(&(ops.len() as u16).to_le_bytes());
        buf.extend_from_slice(ops);
        buf.push(0); // no more blocks
    }
}

/// A raw socket on 127.0.0.1 that sends crafted datagrams and reads what comes back.
fn raw_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(QUIET)).unwrap();
    socket
}

/// Datagrams `socket` receives until it has been quiet for [`QUIET`] (at most 100).
fn drain(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while got.len() < 100 {
        match socket.recv_from(&mut buf) {
            Ok((len, _)) => got.push(buf[..len].to_vec()),
            Err(_) => break,
        }
    }
    got
}

/// Finding 2: a SynAck whose `SetMaxVersion` is below the version of a key it carries used to
/// trip `assert!(node_delta.max_version >= self.max_version)` and kill the chitchat task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synack_with_a_low_set_max_version_does_not_stop_gossip() {
    let (a, b) = pair(None).await;
    counts_propagate(&b, &a, "before", 3).await;

    let fake_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut message = wire::header(wire::SYN_ACK);
    // The digest introduces the node the delta then updates.
    wire::digest(&mut message, &[("evil".to_string(), 5, 0)], fake_addr);
    let mut ops = Vec::new();
    ops.push(0); // node op
    wire::chitchat_id(&mut ops, "evil", 1, fake_addr);
    wire::u64(&mut ops, 0); // last_gc_version
    wire::u64(&mut ops, 0); // from_version_excluded
    ops.push(1); // key-value op at version 100
    wire::str(&mut ops, "key");
    wire::str(&mut ops, "value");
    wire::u64(&mut ops, 100);
    ops.push(0); // set
    ops.push(2); // SetMaxVersion 5, below the key's version
    wire::u64(&mut ops, 5);
    wire::delta(&mut message, &ops);

    let raw = raw_socket();
    raw.send_to(&wire::plain_frame(1, &message), a.addr)
        .unwrap();
    tokio::time::sleep(QUIET).await;

    counts_propagate(&b, &a, "after", 3).await;
    counts_propagate(&a, &b, "after-reverse", 3).await;
    let counts = a.gossip.membership().transport;
    assert!(counts.rejected_malformed >= 1, "{counts:?}");
}

/// Finding 2: enough fake node ids in digests used to grow the node's own digest past a
/// datagram, so the next Syn tripped `assert!(mtu >= 100)` and killed the chitchat task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_fake_node_ids_do_not_stop_gossip() {
    let (a, b) = pair(None).await;
    counts_propagate(&b, &a, "before", 3).await;

    let fake_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let raw = raw_socket();
    // 6 Syns of 600 fake nodes each: 3,600 node ids, ~180 KB of digest.
    for round in 0..6u32 {
        let nodes: Vec<(String, u64, u64)> = (0..600)
            .map(|i| (format!("fake-{round}-{i:04}"), 1_000, 0))
            .collect();
        let mut message = wire::header(wire::SYN);
        wire::digest(&mut message, &nodes, fake_addr);
        wire::str(&mut message, "test");
        raw.send_to(&wire::plain_frame(round, &message), a.addr)
            .unwrap();
    }
    tokio::time::sleep(QUIET).await;

    counts_propagate(&b, &a, "after", 3).await;
    counts_propagate(&a, &b, "after-reverse", 3).await;
}

/// An opened mesh socket (not a chitchat node) with `options`, and its address.
async fn mesh_socket(options: TransportOptions) -> (MeshTransport, Box<dyn Socket>) {
    let std_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = std_socket.local_addr().unwrap();
    let transport = MeshTransport::with_options(std_socket, options);
    let socket = transport.open(addr).await.unwrap();
    (transport, socket)
}

fn options(node_id: &str, secret: &str) -> TransportOptions {
    TransportOptions {
        node_id: Some(node_id.to_string()),
        secret: Some(MeshSecret::new(secret).unwrap()),
        ..TransportOptions::default()
    }
}

fn syn(cluster_id: &str) -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: cluster_id.to_string(),
            digest: Default::default(),
        },
    }
}

/// Sends a Syn of cluster "test" from a mesh socket with `options` and returns the datagram as
/// it went on the wire (captured by a plain socket).
async fn capture_syn(options: TransportOptions) -> Vec<u8> {
    let (_transport, mut socket) = mesh_socket(options).await;
    let capture = raw_socket();
    socket
        .send(capture.local_addr().unwrap(), syn("test"))
        .await
        .unwrap();
    let mut got = drain(&capture);
    assert_eq!(got.len(), 1, "one datagram captured");
    got.remove(0)
}

/// Finding 3: an authenticated datagram replayed, from its source or any other, is dropped and
/// counted; the node keeps gossiping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_authenticated_datagram_is_dropped() {
    let (a, b) = pair(Some("mesh secret")).await;
    let captured = capture_syn(options("sniffed", "mesh secret")).await;

    // The first delivery is genuine: node a answers it with a SynAck.
    let replayer = raw_socket();
    replayer.send_to(&captured, a.addr).unwrap();
    assert_eq!(drain(&replayer).len(), 1, "the original is answered");
    // The same bytes again, from the same source and from another: no answer.
    replayer.send_to(&captured, a.addr).unwrap();
    let other = raw_socket();
    other.send_to(&captured, a.addr).unwrap();
    assert!(drain(&replayer).is_empty(), "a replay was answered");
    assert!(
        drain(&other).is_empty(),
        "a replay from elsewhere was answered"
    );

    let counts = a.gossip.membership().transport;
    assert_eq!(counts.rejected_replay, 2, "{counts:?}");
    counts_propagate(&b, &a, "after-replay", 3).await;
}

/// A chitchat node (not a hivemind node) over a mesh transport with `options`, holding `kvs`.
async fn chitchat_node(
    name: &str,
    seeds: Vec<String>,
    kvs: Vec<(String, String)>,
    options: TransportOptions,
) -> (ChitchatHandle, MeshTransport, ChitchatId) {
    let std_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = std_socket.local_addr().unwrap();
    let transport = MeshTransport::with_options(std_socket, options);
    let id = ChitchatId::new(name, 0, addr);
    let config = ChitchatConfig {
        chitchat_id: id.clone(),
        cluster_id: "test".to_string(),
        gossip_interval: INTERVAL,
        listen_addr: addr,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    let handle = spawn_chitchat(config, kvs, &transport).await.unwrap();
    (handle, transport, id)
}

/// Waits until `observer` holds `key` of node `of`.
async fn learns(observer: &ChitchatHandle, of: &ChitchatId, key: &str) {
    let start = Instant::now();
    loop {
        let known = observer
            .with_chitchat(|c| c.node_state(of).is_some_and(|s| s.get(key).is_some()))
            .await;
        if known {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{key} of {of:?} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finding 3: during a rolling secret change a node accepts datagrams signed with either
/// secret, so nodes configured before and after the change keep talking to each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_signed_with_the_previous_secret_is_accepted_during_rotation() {
    let both = |name: &str, secret: &str, previous: &str| TransportOptions {
        previous_secret: Some(MeshSecret::new(previous).unwrap()),
        ..options(name, secret)
    };
    // Already switched: signs with "new", still accepts "old".
    let (ha, ta, id_a) = chitchat_node(
        "switched",
        Vec::new(),
        vec![("from-a".into(), "1".into())],
        both("switched", "new", "old"),
    )
    .await;
    // Not switched yet: signs with "old", already accepts "new".
    let (hb, tb, id_b) = chitchat_node(
        "pending",
        vec![id_a.gossip_advertise_addr.to_string()],
        vec![("from-b".into(), "1".into())],
        both("pending", "old", "new"),
    )
    .await;
    learns(&ha, &id_b, "from-b").await;
    learns(&hb, &id_a, "from-a").await;
    let (ca, cb) = (ta.stats().snapshot(), tb.stats().snapshot());
    assert!(ca.accepted_previous_secret > 0, "{ca:?}");
    assert!(cb.accepted_previous_secret > 0, "{cb:?}");
    assert_eq!(ca.rejected_auth + cb.rejected_auth, 0, "{ca:?} {cb:?}");

    // A crafted datagram signed with the previous secret only is answered; one signed with a
    // secret neither node knows is not.
    let old = capture_syn(options("old-only", "old")).await;
    let unknown = capture_syn(options("unknown", "neither")).await;
    let raw = raw_socket();
    raw.send_to(&old, id_a.gossip_advertise_addr).unwrap();
    assert_eq!(drain(&raw).len(), 1, "the previous secret is accepted");
    raw.send_to(&unknown, id_a.gossip_advertise_addr).unwrap();
    assert!(drain(&raw).is_empty(), "an unknown secret was accepted");
    assert_eq!(ta.stats().snapshot().rejected_auth, 1);
    ha.shutdown().await.unwrap();
    hb.shutdown().await.unwrap();
}

/// Finding 3: an authenticated datagram older than the freshness window is dropped and
/// counted, while fresh ones are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_with_a_stale_timestamp_is_dropped() {
    let freshness = Duration::from_millis(500);
    let (handle, transport, id) = chitchat_node(
        "receiver",
        Vec::new(),
        Vec::new(),
        TransportOptions {
            freshness,
            ..options("receiver", "s")
        },
    )
    .await;
    let stale = capture_syn(options("late", "s")).await;
    tokio::time::sleep(freshness * 3).await;
    let raw = raw_socket();
    raw.send_to(&stale, id.gossip_advertise_addr).unwrap();
    assert!(drain(&raw).is_empty(), "a stale datagram was answered");
    assert_eq!(transport.stats().snapshot().rejected_stale, 1);
    let fresh = capture_syn(options("late", "s")).await;
    raw.send_to(&fresh, id.gossip_advertise_addr).unwrap();
    assert_eq!(drain(&raw).len(), 1, "a fresh datagram is answered");
    handle.shutdown().await.unwrap();
}
