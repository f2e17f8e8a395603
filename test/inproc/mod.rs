//! In-process servers for integration tests: `hivemind::server::run` on listeners bound to
//! 127.0.0.1:0, stopped through the same shutdown future the binary uses for SIGTERM.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::PathBuf;

use hivemind::proto::{
    DescriptorEntry, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
    RateLimitServiceClient,
};
use hivemind::server::{self, Listeners, ServerError};
use hivemind::settings::Settings;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A server running inside the test process.
pub struct InProc {
    /// The gRPC rate limit service address.
    pub grpc_addr: SocketAddr,
    /// The admin HTTP address.
    pub admin_addr: SocketAddr,
    /// The rules file the server watches.
    pub rules_path: PathBuf,
    /// Completing it starts graceful shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// The server task.
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// Holds the rules file.
    _dir: tempfile::TempDir,
}

impl InProc {
    /// Starts a server with `rules_yaml` as its rules file; `tweak` adjusts settings. The
    /// strategy is standalone unless `tweak` says otherwise; a mesh binds 127.0.0.1:0.
    pub async fn start(rules_yaml: &str, tweak: impl FnOnce(&mut Settings)) -> InProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules_path = dir.path().join("ratelimit.yaml");
        std::fs::write(&rules_path, rules_yaml).expect("write rules");
        let mut settings = Settings::default();
        settings.grpc.addr = "127.0.0.1:0".parse().unwrap();
        settings.admin.addr = "127.0.0.1:0".parse().unwrap();
        settings.rules.path = rules_path.clone();
        settings.strategy = hivemind::settings::StrategyKind::Standalone;
        #[cfg(feature = "gossip")]
        {
            settings.mesh.addr = "127.0.0.1:0".parse().unwrap();
        }
        tweak(&mut settings);
        let listeners = Listeners::bind(&settings).await.expect("bind listeners");
        let (grpc_addr, admin_addr) = listeners.local_addrs().expect("local addrs");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(settings, listeners, async move {
            let _ = stopped.await;
        }));
        InProc {
            grpc_addr,
            admin_addr,
            rules_path,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    /// A gRPC client connected to the rate limit service.
    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("connect to the rate limit service")
    }

    /// The admin base URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// `GET path` on the admin listener, parsed as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// Starts graceful shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Starts graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.begin_stop();
        (&mut self.task).await.expect("server task panicked")
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC client of the rate limit service.
pub type Client = RateLimitServiceClient<Channel>;

/// One `ShouldRateLimit` call that must succeed; its response.
pub async fn ask(client: &mut Client, request: RateLimitRequest) -> RateLimitResponse {
    client
        .should_rate_limit(request)
        .await
        .expect("ShouldRateLimit call")
        .into_inner()
}

/// A request for `domain` with one descriptor per entry list.
pub fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors
            .iter()
            .map(|entries| descriptor(entries))
            .collect(),
        hits_addend: 0,
    }
}

/// A descriptor with these entries.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| DescriptorEntry {
                key: (*key).into(),
                value: (*value).into(),
            })
            .collect(),
        ..Default::default()
    }
}
