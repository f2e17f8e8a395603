//! Gossip traffic per node with many active keys: three in-process nodes on loopback, each
//! hitting `KEYS` distinct counter keys (`LIMIT` per minute each) in a steady round-robin at
//! `HITS_PER_SEC` per node, for `SECONDS` seconds; prints the bytes each node sent per second.
//!
//!   cargo run --release -p hivemind-gossip --example mesh_traffic [KEYS] [SECONDS] [HITS_PER_SEC] [LIMIT]

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hivemind_core::{
    Clock, Enforcement, Hit, Limit, LocalCounters, SyncStrategy, SystemClock, Unit,
};
use hivemind_gossip::{Admission, Gossip, GossipConfig};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let keys: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let rate: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let limit: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let mut nodes = Vec::new();
    let mut seed = Vec::new();
    for i in 0..3 {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let config = GossipConfig {
            node_id: format!("node{i}"),
            generation: 1,
            cluster_id: "traffic".into(),
            advertise_addr: addr,
            seeds: seed.clone(),
            gossip_interval: Duration::from_millis(100),
            dead_node_grace_period: Duration::from_secs(60),
            secret: None,
            previous_secret: None,
            max_keys_per_round: 3_000,
            admission: Admission {
                extrapolate: true,
                fair_share: true,
                horizon_millis: 300,
            },
            early_publish_fraction: 0.8,
            sweep_interval: Duration::from_secs(1),
        };
        let counters = Arc::new(LocalCounters::new(1_000_000));
        let gossip = Gossip::start(config, socket, counters, Arc::new(SystemClock))
            .await
            .unwrap();
        if seed.is_empty() {
            seed.push(addr.to_string());
        }
        nodes.push(Arc::new(gossip));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| n.membership().transport.bytes_sent)
        .collect();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate / 100).max(1);
    let mut next = 0u32;
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        for _ in 0..per_tick {
            let hit = Hit {
                key: format!("traffic|k={}#minute", next % keys),
                limit: Limit {
                    requests_per_unit: limit,
                    unit: Unit::Minute,
                },
                addend: 1,
                enforcement: Enforcement::Enforce,
            };
            for node in &nodes {
                node.check(std::slice::from_ref(&hit), SystemClock.now())
                    .await
                    .unwrap();
            }
            next = next.wrapping_add(1);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    for (i, node) in nodes.iter().enumerate() {
        let m = node.membership();
        let sent = m.transport.bytes_sent - before[i];
        println!(
            "node{i}: {:.1} KB/s sent, {} published keys, {} peer keys, backlog {}",
            sent as f64 / elapsed / 1000.0,
            m.published_keys,
            m.peer_keys,
            m.backlog
        );
    }
}
