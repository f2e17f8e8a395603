//! The running gossip node: chitchat over [`MeshTransport`], the publisher task that writes this
//! node's counts, the absorber task that folds peers' counts into the [`PeerView`], membership
//! tracking, and the [`SyncStrategy`] the rate limit service calls.
//!
//! The request path touches only the local counters and the peer view; chitchat's mutex is taken
//! by the background tasks alone (once per publish round, once per membership poll).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use hivemind_core::{
    window_tag, Clock, CounterReport, Decision, Health, HealthState, Hit, LocalCounters,
    StrategyContext, StrategyError, StrategyStatus, Sweeper, SyncStrategy, UnixTime,
};
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::publish::Publisher;
use crate::settings::MeshSettings;
use crate::transport::{
    LinkControl, MeshSecret, MeshTransport, TransportCounts, TransportOptions, TransportStats,
};
use crate::view::{PeerTracker, PeerView, Refused};
use crate::wire::{decode_entry_key, millis_tag, CountEntry, KeyHasher, COUNTER_PREFIX};

/// Peer publications queued between chitchat's callback and the absorber; beyond it they are
/// dropped (and counted): the next publication of the same key supersedes them anyway.
const ABSORB_QUEUE: usize = 65_536;

/// Publications applied before new keys are flushed to readers.
const ABSORB_BATCH: usize = 4_096;

/// How often membership is polled for join/leave logs and the admin view.
const MEMBERSHIP_POLL: Duration = Duration::from_millis(500);

/// Everything a gossip node needs to run.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// Increases on every start (peers ignore updates from an older generation): start time in
    /// milliseconds.
    pub generation: u64,
    /// Nodes of another cluster id are ignored.
    pub cluster_id: String,
    /// The address peers reach this node's mesh socket at.
    pub advertise_addr: SocketAddr,
    /// Seed peers `host:port` (DNS names are re-resolved by chitchat).
    pub seeds: Vec<String>,
    /// Chitchat's gossip round interval.
    pub gossip_interval: Duration,
    /// How long a dead node's state is kept before chitchat forgets it.
    pub dead_node_grace_period: Duration,
    /// When set, every datagram is authenticated with it.
    pub secret: Option<MeshSecret>,
    /// Also accepted on receipt while a secret change rolls out (never used to sign).
    pub previous_secret: Option<MeshSecret>,
    /// The most counter keys published per gossip interval (chitchat carries ~2,500–4,000
    /// changed keys per round between two nodes).
    pub max_keys_per_round: usize,
    /// The overshoot-reduction mechanisms in use.
    pub admission: Admission,
    /// Publish out of turn when a key's global count crosses this fraction of its limit
    /// (0 turns it off).
    pub early_publish_fraction: f64,
    /// How often local counters drop ended windows.
    pub sweep_interval: Duration,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The mesh socket or chitchat failed to start.
    #[error("gossip mesh did not start: {0}")]
    Start(String),
    /// The `mesh` settings cannot be used.
    #[error(transparent)]
    Settings(#[from] crate::settings::MeshSettingsError),
}

/// One peer as the admin endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id.
    pub node_id: String,
    /// Its generation (start time in ms).
    pub generation: u64,
    /// Its mesh address.
    pub addr: SocketAddr,
}

/// Membership and traffic of this node's mesh, for `/healthcheck` and the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// Live peers (this node excluded).
    pub live: Vec<PeerInfo>,
    /// Peers the failure detector considers dead (kept until the grace period ends).
    pub dead: Vec<PeerInfo>,
    /// Counter keys this node has published (and not deleted).
    pub published_keys: usize,
    /// Counter keys known from peers.
    pub peer_keys: usize,
    /// Changed keys waiting for a later round (over the per-round budget).
    pub backlog: usize,
    /// Peer publications dropped because the absorber fell behind.
    pub absorb_dropped: u64,
    /// Datagram counts of the mesh socket.
    pub transport: TransportCounts,
}

/// State shared between the strategy and its tasks.
struct Shared {
    /// This node's counts (the only ones it writes).
    counters: Arc<LocalCounters>,
    /// Peers' counts.
    view: PeerView,
    /// Which overshoot-reduction mechanisms are on.
    admission: Admission,
    /// Fraction of a limit at which a key is published out of turn (0 = off).
    early_publish_fraction: f64,
    /// Wakes the publisher out of turn.
    publish_now: Notify,
    /// Latest membership, refreshed by the membership task.
    membership: Mutex<Membership>,
    /// Published keys / backlog of the last round (written by the publisher).
    published_keys: AtomicU64,
    backlog: AtomicU64,
    /// Peer keys tracked (written by the absorber).
    peer_keys: AtomicU64,
    /// Publications dropped on a full absorber queue.
    absorb_dropped: AtomicU64,
    /// Peer input the tracker refused, by reason (written by the absorber).
    refused: Mutex<Refused>,
    /// Live peers (written by the membership task): a key's peer count is clamped to
    /// `limit × live peers`, the most they could have admitted.
    live_peers: AtomicU64,
    /// Datagram counters of the current mesh socket (replaced when the mesh restarts).
    transport: ArcSwap<TransportStats>,
    /// This node's chitchat id and whether its chitchat task runs (the supervisor writes it).
    mesh: Mutex<MeshState>,
    /// Wakes the supervisor to abort the chitchat task (fault injection).
    crash: Notify,
    /// Names counter keys on the wire, the same on every node of the cluster.
    hasher: KeyHasher,
}

/// The chitchat task as the supervisor last saw it.
#[derive(Debug, Clone)]
struct MeshState {
    /// This node's id; the generation grows with every restart.
    id: ChitchatId,
    /// Whether the chitchat task runs.
    up: bool,
    /// Times the mesh was restarted after its task ended.
    restarts: u64,
    /// Why the task last ended.
    last_failure: Option<String>,
}

/// The `gossip` strategy. Dropping it (or [`SyncStrategy::shutdown`]) stops the node.
pub struct Gossip {
    /// State the tasks share.
    shared: Arc<Shared>,
    /// Drops ended windows from the local counters; stopped with the node.
    sweeper: Sweeper,
    /// Set to stop the supervisor, which shuts chitchat down cleanly.
    stop: watch::Sender<bool>,
    /// Runs chitchat and its publisher and membership tasks, restarting them if chitchat ends.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Folds peers' publications into the view; outlives mesh restarts.
    absorber: JoinHandle<()>,
    /// Cuts links to chosen peers (tests of partitions), on the first mesh socket.
    links: LinkControl,
}

/// One run of chitchat: its handle, the tasks that use it, and the event subscription.
struct MeshRun {
    /// Chitchat; dropping the handle stops gossiping.
    handle: ChitchatHandle,
    /// Publisher and membership tasks on this chitchat.
    tasks: Vec<JoinHandle<()>>,
    /// Keeps the subscription to peers' publications alive.
    _listener: chitchat::ListenerHandle,
}

impl MeshRun {
    /// Starts chitchat with `generation` on `socket`, subscribes to peers' publications (queued
    /// on `tx`), and spawns the publisher and membership tasks.
    async fn start(
        config: &GossipConfig,
        generation: u64,
        socket: std::net::UdpSocket,
        shared: &Arc<Shared>,
        tx: &mpsc::Sender<(ChitchatId, u64, CountEntry)>,
        clock: &Arc<dyn Clock>,
    ) -> Result<(MeshRun, LinkControl), GossipError> {
        let listen_addr = socket
            .local_addr()
            .map_err(|e| GossipError::Start(format!("mesh socket: {e}")))?;
        let transport = MeshTransport::with_options(
            socket,
            TransportOptions {
                node_id: Some(config.node_id.clone()),
                secret: config.secret.clone(),
                previous_secret: config.previous_secret.clone(),
                ..TransportOptions::default()
            },
        );
        let links = transport.links();
        let id = ChitchatId::new(config.node_id.clone(), generation, config.advertise_addr);
        let interval = config.gossip_interval.max(Duration::from_millis(10));
        let chitchat_config = ChitchatConfig {
            chitchat_id: id.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: interval,
            listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                // Tuned to the interval so a dead node is noticed in ~2 s, not tens of seconds.
                initial_interval: interval,
                max_interval: interval * 20,
                phi_threshold: 8.0,
                sampling_window_size: 1_000,
                dead_node_grace_period: config.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: (interval * 50).max(Duration::from_secs(5)),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(chitchat_config, Vec::new(), &transport)
            .await
            .map_err(|e| GossipError::Start(format!("{e:#}")))?;
        shared.transport.store(transport.stats());

        // Peers' publications: chitchat calls this under its lock, so it only parses and queues.
        let self_id = id.clone();
        let dropped = shared.clone();
        let tx = tx.clone();
        let listener = handle
            .with_chitchat(move |chitchat| {
                let tx = tx.clone();
                let self_id = self_id.clone();
                let dropped = dropped.clone();
                chitchat.subscribe_event(COUNTER_PREFIX, move |event| {
                    if *event.node == self_id {
                        return;
                    }
                    // The event's key comes without the subscribed prefix.
                    let full_key = format!("{COUNTER_PREFIX}{}", event.key);
                    let (Some(hash), Some(entry)) =
                        (decode_entry_key(&full_key), CountEntry::decode(event.value))
                    else {
                        return;
                    };
                    if tx.try_send((event.node.clone(), hash, entry)).is_err() {
                        dropped.absorb_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .await;

        let publish_every = interval / 4;
        let budget = (config.max_keys_per_round / 4).max(1);
        let tasks = vec![
            tokio::spawn(publish(
                shared.clone(),
                handle.chitchat(),
                clock.clone(),
                publish_every,
                budget,
            )),
            tokio::spawn(watch_membership(
                shared.clone(),
                handle.chitchat(),
                id.clone(),
            )),
        ];
        shared
            .mesh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id = id;
        Ok((
            MeshRun {
                handle,
                tasks,
                _listener: listener,
            },
            links,
        ))
    }

    /// Stops the tasks, then chitchat (cleanly, unless it already ended).
    async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Err(e) = self.handle.shutdown().await {
            debug!(error = %e, "chitchat shutdown");
        }
    }
}

/// What the supervisor needs to restart the mesh.
struct Supervised {
    /// The node's configuration (the generation grows on each restart).
    config: GossipConfig,
    /// The address to bind again.
    listen_addr: SocketAddr,
    /// State shared with the strategy.
    shared: Arc<Shared>,
    /// The absorber's queue, handed to each new subscription.
    tx: mpsc::Sender<(ChitchatId, u64, CountEntry)>,
    /// Time for the publisher.
    clock: Arc<dyn Clock>,
}

/// Watches the chitchat task; when it ends unexpectedly, reports the mesh down, binds the same
/// address again (with backoff) and restarts with a new generation. Returns when `stopped` is
/// set, after shutting chitchat down.
async fn supervise(mut run: MeshRun, s: Supervised, mut stopped: watch::Receiver<bool>) {
    loop {
        let ended = run.handle.termination_watcher();
        tokio::select! {
            () = stop_requested(&mut stopped) => {
                run.stop().await;
                return;
            }
            () = s.shared.crash.notified() => {
                run.handle.abort();
                continue;
            }
            result = ended => {
                let why = match result {
                    Ok(()) => "chitchat stopped".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                warn!(error = %why, "gossip mesh task ended; restarting it");
                {
                    let mut mesh = s.shared.mesh.lock().unwrap_or_else(PoisonError::into_inner);
                    mesh.up = false;
                    mesh.last_failure = Some(why);
                }
                for task in &run.tasks {
                    task.abort();
                }
                drop(run);
            }
        }
        let mut delay = Duration::from_millis(20);
        let mut attempts = 0u32;
        run = loop {
            tokio::select! {
                () = stop_requested(&mut stopped) => return,
                () = tokio::time::sleep(delay) => {}
            }
            attempts += 1;
            let generation = restart_generation(&s.shared);
            let started = match std::net::UdpSocket::bind(s.listen_addr)
                .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            {
                Ok(socket) => {
                    MeshRun::start(&s.config, generation, socket, &s.shared, &s.tx, &s.clock).await
                }
                Err(e) => Err(GossipError::Start(format!(
                    "binding {}: {e}",
                    s.listen_addr
                ))),
            };
            match started {
                Ok((run, _links)) => {
                    let restarts = {
                        let mut mesh = s.shared.mesh.lock().unwrap_or_else(PoisonError::into_inner);
                        mesh.up = true;
                        mesh.restarts += 1;
                        mesh.restarts
                    };
                    info!(generation, restarts, attempts, "gossip mesh restarted");
                    break run;
                }
                Err(e) => {
                    if attempts == 1 {
                        warn!(error = %e, "gossip mesh restart failed; retrying with backoff");
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
    }
}

/// Completes once `stopped` is set (or its sender is gone).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// A generation above the current one (peers ignore updates from an older generation): the
/// time in ms, or one more than the last if the clock has not moved past it.
fn restart_generation(shared: &Shared) -> u64 {
    let last = shared
        .mesh
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .id
        .generation_id;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.max(last + 1)
}

impl Gossip {
    /// Starts a node as the `mesh` settings say, on `socket` (bound by
    /// [`MeshSettings::bind`]), with fresh local counters bounded as `context` says.
    pub async fn from_settings(
        settings: &MeshSettings,
        socket: std::net::UdpSocket,
        context: &StrategyContext,
    ) -> Result<Gossip, GossipError> {
        let bound = socket
            .local_addr()
            .map_err(|e| GossipError::Start(format!("mesh socket: {e}")))?;
        let config = settings.gossip_config(bound, context.counters.sweep_interval)?;
        if settings.reachable_from_other_hosts() && config.secret.is_none() {
            warn!(
                addr = %bound,
                "mesh.insecure: the mesh is reachable from other hosts without a secret; anyone who reaches it can join and publish counts"
            );
        }
        Gossip::start(
            config,
            socket,
            context.counters.build(),
            context.clock.clone(),
        )
        .await
    }

    /// Starts a node on `socket` (already bound: the address the server reports), with local
    /// `counters` and `clock`. Must run inside a tokio runtime.
    ///
    /// A supervisor watches the chitchat task: if it ends (a panic, a socket error), the
    /// node reports itself down, binds the same address again and rejoins with a new
    /// generation, keeping its counters and what it knows of its peers.
    pub async fn start(
        config: GossipConfig,
        socket: std::net::UdpSocket,
        counters: Arc<LocalCounters>,
        clock: Arc<dyn Clock>,
    ) -> Result<Gossip, GossipError> {
        let listen_addr = socket
            .local_addr()
            .map_err(|e| GossipError::Start(format!("mesh socket: {e}")))?;
        let shared = Arc::new(Shared {
            counters,
            view: PeerView::default(),
            admission: config.admission,
            early_publish_fraction: config.early_publish_fraction,
            publish_now: Notify::new(),
            membership: Mutex::new(Membership::default()),
            published_keys: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            peer_keys: AtomicU64::new(0),
            absorb_dropped: AtomicU64::new(0),
            refused: Mutex::new(Refused::default()),
            live_peers: AtomicU64::new(0),
            transport: ArcSwap::from_pointee(TransportStats::default()),
            mesh: Mutex::new(MeshState {
                id: ChitchatId::new(
                    config.node_id.clone(),
                    config.generation,
                    config.advertise_addr,
                ),
                up: true,
                restarts: 0,
                last_failure: None,
            }),
            crash: Notify::new(),
            hasher: KeyHasher::for_cluster(&config.cluster_id),
        });
        // Peers' publications, queued by chitchat's callback for the absorber; the absorber
        // outlives mesh restarts, so what is known of peers survives them.
        let (tx, rx) = mpsc::channel::<(ChitchatId, u64, CountEntry)>(ABSORB_QUEUE);
        let interval = config.gossip_interval.max(Duration::from_millis(10));
        let stale_after = (interval * 5).as_millis() as u32;
        let absorber = tokio::spawn(absorb(shared.clone(), rx, clock.clone(), stale_after));
        let sweep_interval = config.sweep_interval;
        let (run, links) =
            MeshRun::start(&config, config.generation, socket, &shared, &tx, &clock).await?;
        info!(
            node_id = %config.node_id,
            generation = config.generation,
            listen = %listen_addr,
            advertise = %config.advertise_addr,
            seeds = ?config.seeds,
            authenticated = config.secret.is_some(),
            "gossip mesh started"
        );
        let (stop, stopped) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(
            run,
            Supervised {
                config,
                listen_addr,
                shared: shared.clone(),
                tx,
                clock: clock.clone(),
            },
            stopped,
        ));
        let sweeper = Sweeper::spawn(shared.counters.clone(), clock, sweep_interval);
        Ok(Gossip {
            shared,
            sweeper,
            stop,
            supervisor: Mutex::new(Some(supervisor)),
            absorber,
            links,
        })
    }

    /// Ends the chitchat task as a crash would (fault injection: tests of the supervisor).
    #[doc(hidden)]
    pub fn abort_mesh_task(&self) {
        self.shared.crash.notify_one();
    }

    /// The latest membership and traffic figures.
    pub fn membership(&self) -> Membership {
        let mut m = self
            .shared
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        m.published_keys = self.shared.published_keys.load(Ordering::Relaxed) as usize;
        m.backlog = self.shared.backlog.load(Ordering::Relaxed) as usize;
        m.peer_keys = self.shared.peer_keys.load(Ordering::Relaxed) as usize;
        m.absorb_dropped = self.shared.absorb_dropped.load(Ordering::Relaxed);
        m.transport = self.shared.transport.load().snapshot();
        m
    }

    /// The supervisor's view of the chitchat task.
    fn mesh_state(&self) -> MeshState {
        self.shared
            .mesh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This node's id and generation.
    pub fn node(&self) -> (String, u64) {
        let mesh = self.mesh_state();
        (mesh.id.node_id.to_string(), mesh.id.generation_id)
    }

    /// Whether the chitchat task runs, and how many times it was restarted.
    pub fn mesh_up(&self) -> (bool, u64) {
        let mesh = self.mesh_state();
        (mesh.up, mesh.restarts)
    }

    /// Link control of the mesh socket (tests cut links to simulate partitions).
    pub fn links(&self) -> &LinkControl {
        &self.links
    }

    /// The peers' count estimate for a counter key (tests and diagnostics).
    pub fn peer_count(&self, counter_key: &str, unit: hivemind_core::Unit, now: UnixTime) -> u32 {
        self.shared
            .view
            .estimate(
                self.shared.hasher.hash(counter_key),
                window_tag(now, unit),
                millis_tag(now),
                0,
            )
            .published
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.absorber.abort();
        if let Some(supervisor) = self
            .supervisor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            supervisor.abort();
        }
    }
}

#[async_trait]
impl SyncStrategy for Gossip {
    async fn check(&self, batch: &[Hit], now: UnixTime) -> Result<Vec<Decision>, StrategyError> {
        let shared = &self.shared;
        let now_millis = millis_tag(now);
        let horizon = shared.admission.read_horizon();
        let live_peers = shared.live_peers.load(Ordering::Relaxed);
        // One buffer: what admission counts against each hit's limit (first half), then the
        // peers' estimate each decision reports (second half).
        let n = batch.len();
        let mut offsets = vec![0u32; 2 * n];
        for (i, hit) in batch.iter().enumerate() {
            let unit = hit.limit.unit;
            let mut peers = shared.view.estimate(
                shared.hasher.hash(&hit.key),
                window_tag(now, unit),
                now_millis,
                horizon,
            );
            // No peer admits more than the limit in a window: a larger sum is forged or
            // stale, and is clamped so it cannot overflow the arithmetic below.
            let most = u64::from(hit.limit.requests_per_unit) * live_peers.max(1);
            peers.clamp_total(u32::try_from(most).unwrap_or(u32::MAX));
            let own = if shared.admission.needs_own_count(&peers) {
                shared.counters.count(&hit.key, unit, now)
            } else {
                0
            };
            offsets[i] = shared
                .admission
                .offset(&peers, own, hit.limit.requests_per_unit);
            offsets[n + i] = shared.admission.counted(&peers);
        }
        let (admission, counted) = offsets.split_at(n);
        let mut decisions = shared.counters.check_with_offsets(batch, admission, now);
        // Report own + peers' estimate: the fair-share reserve decides, but is not a count.
        for (i, (hit, decision)) in batch.iter().zip(&mut decisions).enumerate() {
            decision.count = decision
                .count
                .saturating_sub(admission[i])
                .saturating_add(counted[i]);
            if !decision.over_limit {
                decision.remaining = hit.limit.requests_per_unit.saturating_sub(decision.count);
            }
        }
        if shared.early_publish_fraction > 0.0 {
            let crossed = batch.iter().zip(&decisions).any(|(hit, d)| {
                let mark = f64::from(hit.limit.requests_per_unit) * shared.early_publish_fraction;
                let after = f64::from(d.count);
                !d.over_limit && after >= mark && after - f64::from(hit.addend) < mark
            });
            if crossed {
                shared.publish_now.notify_one();
            }
        }
        Ok(decisions)
    }

    async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor.await;
        }
        self.absorber.abort();
        self.sweeper.stop();
        info!("gossip mesh stopped");
    }

    fn name(&self) -> &'static str {
        "gossip"
    }

    fn status(&self) -> StrategyStatus {
        let m = self.membership();
        let mesh = self.mesh_state();
        let peers = format!("peers: {} live, {} dead", m.live.len(), m.dead.len());
        let health = if mesh.up {
            Health::serving(vec![peers])
        } else {
            // Still deciding with local counts, but not sharing them: not OK.
            Health {
                state: HealthState::Down,
                lines: vec![
                    format!(
                        "mesh: down, restarting ({})",
                        mesh.last_failure.as_deref().unwrap_or("chitchat ended")
                    ),
                    peers,
                ],
            }
        };
        StrategyStatus {
            health,
            counters: Some(CounterReport::of(&self.shared.counters)),
            details: json!({
                "mesh_up": mesh.up,
                "mesh_restarts": mesh.restarts,
                "live_peers": m.live.len(),
                "dead_peers": m.dead.len(),
                "published_keys": m.published_keys,
                "peer_keys": m.peer_keys,
                "backlog": m.backlog,
                "absorb_dropped": m.absorb_dropped,
                "refused": self.refused_json(),
                "transport": transport_json(&m.transport),
            }),
        }
    }

    fn views(&self) -> &'static [&'static str] {
        &["mesh"]
    }

    fn view(&self, name: &str) -> Option<serde_json::Value> {
        (name == "mesh").then(|| self.mesh_view())
    }
}

impl Gossip {
    /// The `/mesh` admin view: this node, live and dead peers with generations, publication
    /// figures and datagram counts.
    pub fn mesh_view(&self) -> serde_json::Value {
        let m = self.membership();
        let (node_id, generation) = self.node();
        let peers = |list: &[PeerInfo]| -> Vec<serde_json::Value> {
            list.iter()
                .map(|p| json!({ "node_id": p.node_id, "generation": p.generation, "addr": p.addr.to_string() }))
                .collect()
        };
        json!({
            "node_id": node_id,
            "generation": generation,
            "live": peers(&m.live),
            "dead": peers(&m.dead),
            "published_keys": m.published_keys,
            "peer_keys": m.peer_keys,
            "backlog": m.backlog,
            "absorb_dropped": m.absorb_dropped,
            "refused": self.refused_json(),
            "transport": transport_json(&m.transport),
        })
    }

    fn refused_json(&self) -> serde_json::Value {
        let r = *self
            .shared
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        json!({
            "ended_window": r.ended_window,
            "future_window": r.future_window,
            "key_cap": r.key_cap,
            "node_cap": r.node_cap,
        })
    }
}

fn transport_json(t: &TransportCounts) -> serde_json::Value {
    json!({
        "datagrams_sent": t.datagrams_sent,
        "bytes_sent": t.bytes_sent,
        "datagrams_received": t.datagrams_received,
        "bytes_received": t.bytes_received,
        "rejected_auth": t.rejected_auth,
        "rejected_malformed": t.rejected_malformed,
        "rejected_replay": t.rejected_replay,
        "rejected_stale": t.rejected_stale,
        "accepted_previous_secret": t.accepted_previous_secret,
        "dropped_by_link_control": t.dropped_by_link_control,
    })
}

/// Folds peers' publications into the view; drops ended windows and stale rates every tick.
async fn absorb(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(ChitchatId, u64, CountEntry)>,
    clock: Arc<dyn Clock>,
    stale_after_millis: u32,
) {
    let mut tracker = PeerTracker::with_key_cap(stale_after_millis, shared.counters.max_keys());
    let mut nodes: BTreeMap<ChitchatId, u32> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = rx.recv() => {
                let Some(first) = received else { return };
                // Apply what is queued (bounded), then publish new keys to readers at once.
                let mut next = Some(first);
                let mut applied = 0;
                while let Some((node, hash, entry)) = next.take() {
                    let index = match nodes.get(&node) {
                        Some(index) => Some(*index),
                        None => {
                            let index = tracker
                                .node_index(&format!("{}/{}", node.node_id, node.generation_id));
                            if let Some(index) = index {
                                nodes.insert(node, index);
                            }
                            index
                        }
                    };
                    if let Some(index) = index {
                        tracker.apply(&shared.view, index, hash, entry, clock.now());
                    }
                    applied += 1;
                    if applied < ABSORB_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                shared.view.flush();
            }
            _ = tick.tick() => {
                tracker.tick(&shared.view, clock.now());
                // Forget the ids of peers the tracker forgot (nothing left in any window).
                if nodes.len() > tracker.nodes() {
                    nodes.retain(|_, index| tracker.has_node(*index));
                }
                shared.peer_keys.store(tracker.keys() as u64, Ordering::Relaxed);
                *shared.refused.lock().unwrap_or_else(PoisonError::into_inner) = tracker.refused();
            }
        }
    }
}

/// Writes this node's changed counts into its chitchat state, every `every` or out of turn.
async fn publish(
    shared: Arc<Shared>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    clock: Arc<dyn Clock>,
    every: Duration,
    budget: usize,
) {
    let mut publisher = Publisher::with_hasher(shared.hasher);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.publish_now.notified() => {}
        }
        let nodes = 1 + shared
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .len();
        let round = publisher.round(&shared.counters, &shared.view, clock.now(), budget, nodes);
        shared
            .published_keys
            .store(publisher.tracked() as u64, Ordering::Relaxed);
        shared
            .backlog
            .store(round.backlog as u64, Ordering::Relaxed);
        if round.sets.is_empty() && round.deletes.is_empty() {
            continue;
        }
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (key, value) in round.sets {
            state.set(key, value);
        }
        for key in &round.deletes {
            state.delete(key);
        }
    }
}

/// Polls membership: logs joins and leaves, keeps the admin view current.
async fn watch_membership(
    shared: Arc<Shared>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    self_id: ChitchatId,
) {
    let info = |id: &ChitchatId| PeerInfo {
        node_id: id.node_id.to_string(),
        generation: id.generation_id,
        addr: id.gossip_advertise_addr,
    };
    let mut tick = tokio::time::interval(MEMBERSHIP_POLL);
    let mut known_live: Vec<PeerInfo> = Vec::new();
    loop {
        tick.tick().await;
        let (live, dead) = {
            let chitchat = chitchat.lock().await;
            let live: Vec<PeerInfo> = chitchat
                .live_nodes()
                .filter(|id| **id != self_id)
                .map(info)
                .collect();
            let dead: Vec<PeerInfo> = chitchat.dead_nodes().map(info).collect();
            (live, dead)
        };
        for peer in live.iter().filter(|p| !known_live.contains(p)) {
            info!(peer = %peer.node_id, generation = peer.generation, addr = %peer.addr, peers = live.len(), "peer joined");
        }
        for peer in known_live.iter().filter(|p| !live.contains(p)) {
            warn!(peer = %peer.node_id, generation = peer.generation, addr = %peer.addr, peers = live.len(), "peer left");
        }
        known_live.clone_from(&live);
        let mut membership = shared
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shared
            .live_peers
            .store(live.len() as u64, Ordering::Relaxed);
        membership.live = live;
        membership.dead = dead;
    }
}
