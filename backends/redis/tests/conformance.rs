//! The `hivemind-core` conformance suite against a real `redis-server` started by the test,
//! on one server and on a three-node Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hivemind_core::{
    CounterConfig, Decision, Hit, StrategyContext, StrategyError, StrategyStatus, SyncStrategy,
    SystemClock, UnixTime,
};
use hivemind_redis::{Redis, RedisSettings};
use hivemind_testkit::{RedisCluster, RedisServer};

fn context() -> StrategyContext {
    StrategyContext {
        clock: Arc::new(SystemClock),
        counters: CounterConfig {
            max_keys: 10_000,
            // The suite drives its own times (in 2023): sweep rarely.
            sweep_interval: Duration::from_secs(3_600),
        },
    }
}

fn settings(url: String, cluster: Vec<String>) -> RedisSettings {
    RedisSettings {
        url,
        cluster_nodes: cluster,
        // Generous: the machine is shared with the compiler; the suite tests decisions.
        timeout: Duration::from_secs(2),
        ..RedisSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conforms() {
    let redis = RedisServer::start();
    let s = settings(redis.url(), Vec::new());
    hivemind_core::testsuite::run_all(|| async {
        let strategy = Redis::from_settings(&s, &context()).await.expect("build");
        assert!(strategy.is_up(), "redis-server is running");
        strategy
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conforms_without_the_over_limit_cache() {
    let redis = RedisServer::start();
    let s = RedisSettings {
        over_limit_cache: false,
        ..settings(redis.url(), Vec::new())
    };
    hivemind_core::testsuite::run_all(|| async {
        Redis::from_settings(&s, &context()).await.expect("build")
    })
    .await;
}

/// The server's counter keys start with the request's domain (`domain|entry=value#unit`), and
/// the domain is the hash tag that puts one request's keys in one Cluster slot. The suite's keys
/// are bare names, so on a cluster they get a domain in front, as the server's would.
struct WithDomain(Redis);

#[async_trait]
impl SyncStrategy for WithDomain {
    async fn check(&self, batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, StrategyError> {
        let keyed: Vec<Hit> = batch
            .iter()
            .map(|hit| Hit {
                key: format!("suite|{}", hit.key),
                ..hit.clone()
            })
            .collect();
        self.0.check(&keyed, now).await
    }
    async fn shutdown(&self) {
        self.0.shutdown().await
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn status(&self) -> StrategyStatus {
        self.0.status()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_conforms() {
    let cluster = RedisCluster::start(3);
    let s = settings(String::new(), cluster.urls());
    hivemind_core::testsuite::run_all(|| async {
        let strategy = Redis::from_settings(&s, &context()).await.expect("build");
        assert!(strategy.is_up(), "the cluster is running");
        WithDomain(strategy)
    })
    .await;
    // The keys really went to the cluster (spread over its nodes by domain, here one slot).
    assert!(cluster.command_calls("evalsha") + cluster.command_calls("eval") > 0);
}
