//! Thread-per-core serving of the gRPC service (`server.threads`).
//!
//! Each event loop is a current-thread tokio runtime on its own OS thread, running its own
//! tonic server over the connections it is handed. One acceptor, on the main runtime, accepts
//! and hands each connection to the next loop round-robin, so a few long-lived HTTP/2
//! connections (Envoy opens about one per worker) still spread over the loops. Everything a
//! call touches (limiter, rules, strategy) is shared; background work stays on the main runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tracing::warn;

use crate::server::ServerError;

/// How the gRPC service is being served, for `/stats`.
#[derive(Debug, Default)]
pub struct ServingStats {
    /// Connections each event loop was handed, by loop; empty in the multi-thread model.
    accepted: Vec<AtomicU64>,
}

/// One event loop's figures in `/stats`.
#[derive(Debug, Serialize)]
pub struct LoopFigures {
    /// Connections the loop has been handed since start.
    pub connections: u64,
}

impl ServingStats {
    /// Stats for `loops` event loops (0: the multi-thread model).
    pub fn new(loops: usize) -> ServingStats {
        ServingStats {
            accepted: (0..loops).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The `server` object of `/stats`.
    pub fn to_json(&self) -> serde_json::Value {
        let loops: Vec<LoopFigures> = self
            .accepted
            .iter()
            .map(|n| LoopFigures {
                connections: n.load(Ordering::Relaxed),
            })
            .collect();
        let model = if loops.is_empty() {
            "multi_thread"
        } else {
            "thread_per_core"
        };
        serde_json::json!({ "model": model, "threads": loops.len(), "loops": loops })
    }
}

/// The running event loops and their acceptor.
pub struct EventLoops {
    /// The acceptor task: ends (dropping the listener) once stopped.
    acceptor: tokio::task::JoinHandle<()>,
    /// One per loop: its server's result once it has drained.
    done: Vec<oneshot::Receiver<Result<(), String>>>,
}

impl EventLoops {
    /// Starts `stats`' number of loops, each serving `router` until `stop` turns true, and the
    /// acceptor handing them connections from `listener`.
    pub fn start(
        listener: TcpListener,
        router: Router,
        stop: watch::Receiver<bool>,
        stats: Arc<ServingStats>,
    ) -> Result<EventLoops, ServerError> {
        let loops = stats.accepted.len();
        let mut senders = Vec::with_capacity(loops);
        let mut done = Vec::with_capacity(loops);
        for index in 0..loops {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ServerError::Serve {
                    what: "event loop",
                    message: format!("cannot build runtime {index}: {e}"),
                })?;
            let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
            let (done_tx, done_rx) = oneshot::channel();
            let router = router.clone();
            let stop = stop.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name(format!("hivemind-loop-{index}"))
                .spawn(move || {
                    let result = runtime.block_on(serve_loop(index, router, rx, stop, stats));
                    let _ = done_tx.send(result);
                })
                .map_err(|e| ServerError::Serve {
                    what: "event loop",
                    message: format!("cannot start thread {index}: {e}"),
                })?;
            senders.push(tx);
            done.push(done_rx);
        }
        let acceptor = tokio::spawn(accept(listener, senders, stop));
        Ok(EventLoops { acceptor, done })
    }

    /// Waits for the acceptor to stop and every loop to drain; the first loop error, if any.
    pub async fn finished(self) -> Result<(), String> {
        let _ = self.acceptor.await;
        let mut result = Ok(());
        for (index, done) in self.done.into_iter().enumerate() {
            let outcome = match done.await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("event loop {index} stopped without a result")),
            };
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

/// One loop: a tonic server over the connections the acceptor sends it.
async fn serve_loop(
    index: usize,
    router: Router,
    connections: mpsc::UnboundedReceiver<std::net::TcpStream>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<ServingStats>,
) -> Result<(), String> {
    // Register each socket with this loop's reactor, so its I/O runs on this thread.
    let incoming =
        UnboundedReceiverStream::new(connections).filter_map(move |std| match TcpStream::from_std(
            std,
        ) {
            Ok(stream) => {
                if let Some(n) = stats.accepted.get(index) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok::<_, std::io::Error>(stream))
            }
            Err(e) => {
                warn!(event_loop = index, error = %e, "cannot register connection; dropped");
                None
            }
        });
    router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(|e| e.to_string())
}

/// Accepts until `stop`, handing connections to the loops round-robin.
async fn accept(
    listener: TcpListener,
    loops: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!(error = %e, "accepting a grpc connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Responses are small and latency-bound: send them without Nagle's delay.
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "cannot detach a grpc connection; dropped");
                continue;
            }
        };
        if let Some(event_loop) = loops.get(next) {
            if event_loop.send(stream).is_err() {
                warn!(event_loop = next, "event loop stopped; connection dropped");
            }
        }
        next = (next + 1) % loops.len().max(1);
    }
}
