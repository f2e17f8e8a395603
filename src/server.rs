//! Wiring: listeners, the strategy, the rules and their reloader, the gRPC and admin servers,
//! and graceful shutdown.
//!
//! [`run`] serves until `shutdown` completes, then marks itself unhealthy while still serving
//! for `shutdown.grace`, stops accepting, drains in-flight calls (at most
//! `shutdown.drain_timeout`), and stops the strategy.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hivemind_core::{Clock, HealthState, StrategyContext, SyncStrategy, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::event_loops::{EventLoops, ServingStats};
use crate::grpc::RateLimitGrpc;
use crate::limiter::Limiter;
use crate::metrics::{Metrics, UPKEEP_INTERVAL};
use crate::proto::{RateLimitServiceServer, FILE_DESCRIPTOR_SET};
use crate::reload;
use crate::rules::{RuleSet, RulesError};
use crate::settings::Settings;
use crate::strategies::{self, StrategySockets};

/// The rules file built into the binary: the server's embedded default when
/// `config/ratelimit.yaml` is not on disk (e.g. `cargo install`, a bare container).
pub const EMBEDDED_RULES: &str = include_str!("../config/ratelimit.yaml");

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The settings hold values that cannot be used (see `Settings::check`).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// The initial rules are invalid.
    #[error("invalid rules: {0}")]
    Rules(#[from] RulesError),
    /// The configured strategy is not available in this build.
    #[error(
        "strategy '{strategy}' is not available in this build of hivemind (available: {available})"
    )]
    StrategyUnavailable {
        /// The strategy asked for.
        strategy: &'static str,
        /// The strategies this build has.
        available: String,
    },
    /// The strategy could not start (mesh, Redis).
    #[error("{0}")]
    Strategy(String),
    /// The gRPC listener's TLS files cannot be read or used.
    #[error("grpc tls: {0}")]
    Tls(String),
    /// A server failed while running.
    #[error("{what} server failed: {message}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// The bound listeners, so a caller can learn their addresses (port 0) before serving.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC rate limit service.
    pub grpc: TcpListener,
    /// The admin HTTP endpoints.
    pub admin: TcpListener,
    /// What the strategy needs bound (the gossip mesh's UDP socket).
    pub strategy: StrategySockets,
}

impl Listeners {
    /// Binds the addresses in `settings`.
    pub async fn bind(settings: &Settings) -> Result<Listeners, ServerError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        let strategy = StrategySockets::bind(settings)?;
        Ok(Listeners {
            grpc: bind("grpc", settings.grpc.addr).await?,
            admin: bind("admin", settings.admin.addr).await?,
            strategy,
        })
    }

    /// The addresses actually bound (gRPC, admin).
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.grpc.local_addr()?, self.admin.local_addr()?))
    }

    /// The mesh socket's address, if the strategy gossips.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.strategy.mesh_addr()
    }
}

/// Where the initial rules came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesSource {
    /// A file or directory on disk, watched for changes.
    Path(PathBuf),
    /// The copy built into the binary (the default path did not exist).
    Embedded,
}

/// Loads the initial rules: the configured path, or the embedded copy when the path is the
/// default one and does not exist.
pub fn load_rules(settings: &Settings) -> Result<(RuleSet, RulesSource), RulesError> {
    let path = &settings.rules.path;
    if settings.rules_path_is_default() && !path.exists() {
        let rules = RuleSet::from_sources(&[(
            "embedded:config/ratelimit.yaml".to_owned(),
            EMBEDDED_RULES.to_owned(),
        )])?;
        return Ok((rules, RulesSource::Embedded));
    }
    Ok((RuleSet::load(path)?, RulesSource::Path(path.clone())))
}

/// Serves on `listeners` with `settings` until `shutdown` completes, then drains and returns.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_ready(settings, listeners, shutdown, || {}).await
}

/// [`run`], calling `ready` once the rules are loaded, the strategy is up and the servers
/// accept calls (the binary prints its `listening` line there, so a line seen means a server
/// that answers).
pub async fn run_with_ready(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), ServerError> {
    let problems = settings.check();
    if !problems.is_empty() {
        let lines = problems.iter().map(|p| format!("{}: {}", p.key, p.problem));
        return Err(ServerError::Settings(lines.collect::<Vec<_>>().join("; ")));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (rules, source) = load_rules(&settings)?;
    info!(
        source = ?source,
        hash = rules.hash(),
        domains = rules.domains().count(),
        "rules loaded"
    );
    let store = Arc::new(ArcSwap::from_pointee(rules));
    let reloader = match &source {
        RulesSource::Path(path) => Some(reload::spawn(
            path.clone(),
            settings.rules.reload_interval,
            store.clone(),
        )),
        RulesSource::Embedded => None,
    };
    let context = StrategyContext {
        clock: clock.clone(),
        counters: settings.counters.config(),
    };
    let strategy = strategies::build(&settings, listeners.strategy, context).await?;
    let mut limiter = Limiter::new(store, strategy.clone(), clock, settings.response.clone());
    let mut _metrics_upkeep = None;
    if settings.metrics.enabled {
        let metrics = Arc::new(Metrics::new(settings.metrics.near_limit_ratio));
        _metrics_upkeep = Some(spawn_metrics_upkeep(metrics.clone()));
        limiter = limiter.with_metrics(metrics);
    }
    let limiter = Arc::new(limiter);
    let _key_cap_monitor = spawn_key_cap_monitor(strategy.clone());

    let serving = Arc::new(AtomicBool::new(true));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RateLimitServiceServer<RateLimitGrpc>>()
        .await;
    // Who may set the gRPC health: the follower below until shutdown takes it over (`true`).
    let health_owner = Arc::new(tokio::sync::Mutex::new(false));
    let _health_follower = spawn_grpc_health_follower(
        strategy.clone(),
        health_reporter.clone(),
        health_owner.clone(),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Serve {
            what: "grpc reflection",
            message: e.to_string(),
        })?;
    let rls = RateLimitServiceServer::new(RateLimitGrpc::new(limiter.clone()))
        .max_decoding_message_size(settings.grpc.max_message_bytes);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = grpc_tls(&settings.grpc)? {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let router = builder
        .add_service(rls)
        .add_service(health_service)
        .add_service(reflection);
    let loops = settings.server.event_loops();
    let serving_stats = Arc::new(ServingStats::new(loops));
    let grpc = if loops == 0 {
        // The baseline model: one work-stealing runtime serves every connection.
        let grpc = router.serve_with_incoming_shutdown(
            // Responses are small and latency-bound: send them without Nagle's delay.
            TcpListenerStream::new(listeners.grpc).map(|stream| {
                stream.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            }),
            stopped(stop_rx.clone()),
        );
        Grpc::Shared(tokio::spawn(grpc))
    } else {
        Grpc::Loops(EventLoops::start(
            listeners.grpc,
            router,
            stop_rx.clone(),
            serving_stats.clone(),
        )?)
    };
    info!(event_loops = loops, "grpc serving model");

    let admin_state = Arc::new(AdminState {
        limiter,
        reload: reloader.as_ref().map(reload::ReloadHandle::status_cell),
        serving: serving.clone(),
        server: serving_stats,
    });
    let admin = axum::serve(listeners.admin, admin::router(admin_state))
        .with_graceful_shutdown(stopped(stop_rx));

    let admin = tokio::spawn(async move { admin.await });
    ready();
    shutdown.await;

    // Fail health first and keep answering for the grace period, so load balancers and
    // Envoy's health checks move traffic away before the listeners close.
    serving.store(false, Ordering::Release);
    {
        let mut shutting_down = health_owner.lock().await;
        *shutting_down = true;
        health_reporter
            .set_not_serving::<RateLimitServiceServer<RateLimitGrpc>>()
            .await;
    }
    if !settings.shutdown.grace.is_zero() {
        info!(grace = ?settings.shutdown.grace, "shutting down: health failing, still serving for the grace period");
        tokio::time::sleep(settings.shutdown.grace).await;
    }
    info!("shutting down: no new connections, draining in-flight calls");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(settings.shutdown.drain_timeout, async {
        let grpc = grpc.finished().await;
        let admin = admin.await;
        (grpc, admin)
    })
    .await;
    strategy.shutdown().await;
    drop(reloader);
    match drained {
        Err(_) => {
            warn!(timeout = ?settings.shutdown.drain_timeout, "drain timed out; exiting with calls in flight");
            Ok(())
        }
        Ok((grpc, admin)) => {
            flatten("grpc", grpc)?;
            flatten("admin", admin.map(|r| r.map_err(|e| e.to_string())))?;
            info!("shutdown complete");
            Ok(())
        }
    }
}

/// The running gRPC server, in either serving model.
enum Grpc {
    /// `server.threads: 0`: one tonic server on the main runtime.
    Shared(tokio::task::JoinHandle<Result<(), tonic::transport::Error>>),
    /// Event loops on their own threads, fed by one acceptor.
    Loops(EventLoops),
}

impl Grpc {
    /// Waits until the server has stopped accepting and drained.
    async fn finished(self) -> Result<Result<(), String>, tokio::task::JoinError> {
        match self {
            Grpc::Shared(task) => task.await.map(|r| r.map_err(|e| e.to_string())),
            Grpc::Loops(loops) => Ok(loops.finished().await),
        }
    }
}

fn flatten(
    what: &'static str,
    result: Result<Result<(), String>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(ServerError::Serve { what, message }),
        Err(join) => Err(ServerError::Serve {
            what,
            message: join.to_string(),
        }),
    }
}

/// Logs when the key cap of the strategy's local counters forces evictions (at most every
/// 10 s), so an operator sees a flood of distinct keys. Dropping the handle stops it.
/// The gRPC listener's TLS: its certificate and key, and the CA client certificates must chain
/// to (mutual TLS) when set. `None`: plaintext.
fn grpc_tls(
    grpc: &crate::settings::GrpcSettings,
) -> Result<Option<tonic::transport::ServerTlsConfig>, ServerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&grpc.tls_cert, &grpc.tls_key) else {
        return Ok(None);
    };
    let read = |setting: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ServerError::Tls(format!("{setting} {}: {e}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("grpc.tls_cert", cert)?,
        read("grpc.tls_key", key)?,
    ));
    if let Some(ca) = &grpc.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("grpc.tls_client_ca", ca)?));
    }
    Ok(Some(tls))
}

/// How often gRPC health is brought in line with the strategy's health.
const GRPC_HEALTH_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// Keeps `grpc.health.v1` in step with the strategy: NOT_SERVING while the strategy is down
/// (as `/healthcheck`'s 503), SERVING otherwise, until shutdown takes `owner` over.
fn spawn_grpc_health_follower(
    strategy: Arc<dyn SyncStrategy>,
    reporter: tonic_health::server::HealthReporter,
    owner: Arc<tokio::sync::Mutex<bool>>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(GRPC_HEALTH_FOLLOW_INTERVAL);
        let mut reported_down = false;
        loop {
            ticker.tick().await;
            let down = strategy.status().health.state == HealthState::Down;
            if down == reported_down {
                continue;
            }
            let shutting_down = owner.lock().await;
            if *shutting_down {
                return;
            }
            if down {
                reporter
                    .set_not_serving::<RateLimitServiceServer<RateLimitGrpc>>()
                    .await;
            } else {
                reporter
                    .set_serving::<RateLimitServiceServer<RateLimitGrpc>>()
                    .await;
            }
            reported_down = down;
        }
    }))
}

/// Folds recorded latency samples into their buckets every [`UPKEEP_INTERVAL`], scraped or
/// not, so the recorder's memory stays flat.
fn spawn_metrics_upkeep(metrics: Arc<Metrics>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticker.tick().await;
            metrics.upkeep();
        }
    }))
}

fn spawn_key_cap_monitor(strategy: Arc<dyn SyncStrategy>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut reported = 0;
        let mut ticker = tokio::time::interval(Duration::from_secs(10));
        loop {
            ticker.tick().await;
            let Some(counters) = strategy.status().counters else {
                continue;
            };
            if counters.evicted_keys > reported {
                warn!(
                    evicted = counters.evicted_keys - reported,
                    evicted_total = counters.evicted_keys,
                    max_keys = counters.max_keys,
                    "counter key cap reached; evicted the coldest keys (raise counters.max_keys if this is legitimate traffic)"
                );
                reported = counters.evicted_keys;
            }
        }
    }))
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!(signal = "SIGINT", "signal received"),
        () = terminate => info!(signal = "SIGTERM", "signal received"),
    }
}
