//! The floor: a constant-answer RLS server on hivemind's gRPC stack and serving model.
//!
//! It answers every `ShouldRateLimit` with OK without looking at the request, served exactly
//! as hivemind serves (tonic, mimalloc, `server.threads` event loops fed round-robin by one
//! acceptor, or `--threads 0` for one multi-thread runtime). What hivemind costs per call
//! beyond it is the cost of deciding. `benches/rls_throughput.sh --floor` compares the two.
//!
//!   cargo run --release --example rls_floor -- [--addr 127.0.0.1:0] [--threads N]
//!
//! Prints `listening grpc=ADDR` once it answers; stops on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use hivemind::event_loops::{EventLoops, ServingStats};
use hivemind::proto::{
    Code, RateLimitRequest, RateLimitResponse, RateLimitService, RateLimitServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// The same allocator as the hivemind binary, so the comparison is of the work alone.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Answers OK to everything.
#[derive(Clone, Copy)]
struct Constant;

#[tonic::async_trait]
impl RateLimitService for Constant {
    async fn should_rate_limit(
        &self,
        _request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let mut addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--addr" => addr = value.parse().context("--addr")?,
            "--threads" => threads = value.parse().context("--threads")?,
            other => anyhow::bail!("unknown argument {other} (--addr ADDR, --threads N)"),
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.context("binding")?;
        let bound = listener.local_addr()?;
        let router =
            tonic::transport::Server::builder().add_service(RateLimitServiceServer::new(Constant));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut stop_shared = stop_rx.clone();
        let serving = if threads == 0 {
            let incoming = TcpListenerStream::new(listener).map(|stream| {
                stream.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
            let serve = router.serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_shared.wait_for(|stop| *stop).await;
            });
            tokio::spawn(async move { serve.await.map_err(|e| e.to_string()) })
        } else {
            let loops = EventLoops::start(
                listener,
                router,
                stop_rx,
                Arc::new(ServingStats::new(threads)),
            )?;
            tokio::spawn(loops.finished())
        };
        println!("listening grpc={bound}");
        hivemind::server::shutdown_signal().await;
        let _ = stop_tx.send(true);
        serving.await?.map_err(anyhow::Error::msg)
    })
}
