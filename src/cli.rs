//! Command-line flags. Each flag is the highest settings layer; only flags given are applied.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::settings::{FlagValues, StrategyKind};

/// hivemind: a rate limit service for Envoy (envoy.service.ratelimit.v3).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Rules file, or a directory of domain files, in the envoyproxy/ratelimit format.
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub rules: Option<PathBuf>,
    /// gRPC address of the rate limit service [default: 127.0.0.1:8081].
    #[arg(short = 'a', long, value_name = "ADDR")]
    pub addr: Option<SocketAddr>,
    /// Admin HTTP address (/healthcheck, /json, /rlconfig, /stats, and the strategy's views
    /// such as /mesh) [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// gRPC event loops, one OS thread each [default: one per core; 0: one shared
    /// multi-thread runtime].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Settings file [default: config/hivemind.yaml if present; env HIVEMIND_SETTINGS].
    #[arg(long, value_name = "PATH")]
    pub settings: Option<PathBuf>,
    /// How nodes agree on counts [default: gossip].
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyKind>,
    /// Use the gossip mesh strategy (same as --strategy gossip).
    #[arg(long, conflicts_with = "strategy")]
    pub mesh: bool,
    /// Mesh node id (generated when absent).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Mesh UDP bind address [default: 127.0.0.1:7946; others need mesh.secret].
    #[arg(long, value_name = "ADDR")]
    pub mesh_addr: Option<SocketAddr>,
    /// Mesh seed peers, comma-separated host:port.
    #[arg(long, value_name = "ADDRS")]
    pub peers: Option<String>,
    /// Redis URL for strategy redis (`redis://[user[:password]@]host:port[/db]`, `rediss://`
    /// for TLS) [default: redis://127.0.0.1:6379]. Prefer HIVEMIND_REDIS__URL for passwords.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated URLs (strategy redis on a cluster).
    #[arg(long, value_name = "URLS")]
    pub redis_cluster_nodes: Option<String>,
    /// Validate the settings and rules, print the effective settings, and exit (0 valid, 1 not).
    #[arg(long)]
    pub check_config: bool,
    /// Ask the server running with these settings for GET /healthcheck on its admin address,
    /// and exit 0 if it is serving, 1 if not (a probe for containers, which have no curl).
    #[arg(long, conflicts_with = "check_config")]
    pub healthcheck: bool,
}

impl Cli {
    /// The flags given, as the top settings layer.
    pub fn flag_values(&self) -> FlagValues {
        let mut flags = FlagValues::default();
        if let Some(rules) = &self.rules {
            flags.set("rules.path", rules.display().to_string());
        }
        if let Some(addr) = self.addr {
            flags.set("grpc.addr", addr.to_string());
        }
        if let Some(addr) = self.admin_addr {
            flags.set("admin.addr", addr.to_string());
        }
        if let Some(threads) = self.threads {
            flags.set("server.threads", threads as u64);
        }
        let strategy = match (self.strategy, self.mesh) {
            (Some(strategy), _) => Some(strategy),
            (None, true) => Some(StrategyKind::Gossip),
            (None, false) => None,
        };
        if let Some(strategy) = strategy {
            flags.set("strategy", strategy.as_str());
        }
        if let Some(id) = &self.node_id {
            flags.set("mesh.node_id", id.as_str());
        }
        if let Some(addr) = self.mesh_addr {
            flags.set("mesh.addr", addr.to_string());
        }
        if let Some(peers) = &self.peers {
            flags.set("mesh.peers", peers.as_str());
        }
        if let Some(url) = &self.redis_url {
            flags.set("redis.url", url.as_str());
        }
        if let Some(nodes) = &self.redis_cluster_nodes {
            flags.set("redis.cluster_nodes", nodes.as_str());
        }
        flags
    }
}
