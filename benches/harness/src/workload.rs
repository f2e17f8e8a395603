//! The offered load: real gRPC clients calling `ShouldRateLimit` at a paced rate.
//!
//! A [`Workload`] is a total rate spread over the target nodes (evenly, or by weights), sent by
//! `clients_per_node` clients per node, each with its own HTTP/2 connection (as several Envoys
//! would), all asking about the same descriptor. Every call becomes a
//! [`truth::Observation`](crate::truth::Observation).
//!
//! **Pacing.** Each client ticks a `tokio::time::Interval` at its share of the rate and makes
//! one call per tick, waiting for the answer before the next one. The missed-tick behaviour is
//! [`MissedTickBehavior::Burst`]: a tick missed because a call was slow, or because the timer
//! (1 ms granularity) is coarser than the period, is made up right away, so the rate offered
//! over a window stays the target rate. `Delay` would instead lower the offered rate whenever
//! the server slows down, quietly shrinking the load the limiter is being measured under. The
//! rate a run actually offered is reported next to the target, so a client that could not keep
//! up (more latency than `clients_per_node / rate` allows) is visible, not hidden.
//!
//! Catching up is capped: a tick that comes due more than `max_lag` after its scheduled time is
//! dropped (counted in [`Load::skipped`]) instead of sent. Without the cap, a client that fell
//! behind during a slow stretch (start-up, a latency spike) would pay the backlog back later
//! in one burst, and a measured window would see, say, 3 % more load than asked for while an
//! earlier one saw less. With it, bursts stay within `max_lag` worth of calls. A client slower
//! than one call per `max_lag` may always run one period late: a tick late by less than its
//! period is not a backlog (the next one is not due yet), and dropping it would take a large
//! part of a low-rate cell's load away on a loaded machine (10 per second over 9 nodes is a
//! call every 1.8 s per client, and a timer late by 20 ms is common there).
//!
//! **Keys.** With [`Workload::keys`] set, each call draws its descriptor value from a
//! [`KeyDist`] (the last entry's value gets the key index appended: `bench-0`, `bench-1`, …),
//! with a seeded generator per client; [`Workload::sticky`] sends each key to one node only
//! (`key % nodes`), each node's rate then being its keys' share of the total.
//!
//! **Latency.** Every observation records how late it went out after its tick
//! ([`Observation::queued_us`](crate::truth::Observation::queued_us)), so latency can be taken
//! from the intended send time (coordinated-omission aware) rather than from the actual one.
//!
//! **Closed loop.** [`Workload::closed_loop`] drops the pacing: each client sends its next call
//! as soon as the previous one is answered, for the maximum-throughput figure.
//!
//! Clients start at evenly staggered offsets within one period so that they do not all fire in
//! the same millisecond. Every client loop is bounded twice: by the deadline and by a count of
//! `ceil(rate × duration)` ticks; every call is bounded by `request_timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hivemind::proto::{
    Code, DescriptorEntry, RateLimitDescriptor, RateLimitRequest, RateLimitServiceClient,
};
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};

use crate::keys::KeyDist;
use crate::truth::{ErrorKind, Observation, Outcome};

/// The most calls one run may plan; beyond it the observations alone would take gigabytes.
pub const MAX_PLANNED_CALLS: f64 = 50_000_000.0;

/// The load to offer.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Domain of every request: the rules file's `domain`.
    pub domain: String,
    /// The entries (key, value) of the one descriptor each request carries.
    pub entries: Vec<(String, String)>,
    /// Total offered rate over all targets, in calls per second.
    pub rate: f64,
    /// Relative share of the rate per target, in target order; empty means even. Lets a run
    /// model skewed traffic (one hot Envoy) without changing anything else.
    pub weights: Vec<f64>,
    /// Concurrent clients (connections) per target; more clients keep the rate at higher
    /// latency, since each has one call in flight.
    pub clients_per_node: usize,
    /// Calls in flight per client connection: each connection is shared by this many client
    /// loops (HTTP/2 streams), as h2load's `-m`. 1 by default.
    pub streams_per_client: usize,
    /// How long to offer load, from the common start.
    pub duration: Duration,
    /// Per-call bound; a call that takes longer is an error, not a decision.
    pub request_timeout: Duration,
    /// Bound on connecting each client before the load starts.
    pub connect_timeout: Duration,
    /// How far behind schedule a client may run and still catch up; ticks later than this are
    /// dropped, so a backlog never turns into a burst of more than `max_lag` worth of calls.
    pub max_lag: Duration,
    /// Several keys instead of the one descriptor of `entries`: the last entry's value becomes
    /// `VALUE-K` for a key `K` drawn per call. `None`: one key.
    pub keys: Option<KeyDist>,
    /// Key `K` always goes to target `K % targets` (weights are then ignored): the hashing of
    /// a key to one Envoy. Only with `keys`.
    pub sticky: bool,
    /// No pacing: each client calls again as soon as it has its answer (`rate` then only
    /// bounds the number of calls), for maximum throughput.
    pub closed_loop: bool,
    /// Wall-clock start of the load, µs since the epoch (e.g. a window boundary); `None`: as
    /// soon as every client is connected. A time already past starts at once.
    pub start_at_us: Option<u64>,
    /// Seed of the key draws: the same seed offers the same key sequence per client.
    pub seed: u64,
}

/// What a workload run produced.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Every call made, sorted by send time.
    pub observations: Vec<Observation>,
    /// Scheduled calls not made because their client was more than `max_lag` behind: a
    /// measure of how far the load generator fell short of the target rate.
    pub skipped: u64,
}

impl Workload {
    /// A workload on one descriptor with even spread, 4 clients per node, a 1 s call timeout,
    /// a 5 s connect timeout and a 20 ms catch-up limit.
    pub fn new(
        domain: impl Into<String>,
        entries: Vec<(String, String)>,
        rate: f64,
        duration: Duration,
    ) -> Self {
        Workload {
            domain: domain.into(),
            entries,
            rate,
            weights: Vec::new(),
            clients_per_node: 4,
            streams_per_client: 1,
            duration,
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            max_lag: Duration::from_millis(20),
            keys: None,
            sticky: false,
            closed_loop: false,
            start_at_us: None,
            seed: 1,
        }
    }

    /// The descriptor value of key `k` (see [`Workload::keys`]).
    pub fn key_value(&self, k: u32) -> String {
        let base = self.entries.last().map_or("", |(_, v)| v.as_str());
        format!("{base}-{k}")
    }

    /// One request per key, indexed by key (one request without `keys`).
    fn requests(&self) -> Vec<RateLimitRequest> {
        let Some(keys) = &self.keys else {
            return vec![self.request()];
        };
        (0..keys.len() as u32)
            .map(|k| {
                let mut request = self.request();
                if let Some(last) = request.descriptors[0].entries.last_mut() {
                    last.value = self.key_value(k);
                }
                request
            })
            .collect()
    }

    /// Per target: its rate and the keys it draws from (`None`: the one request, or all keys).
    fn plan_targets(&self, targets: usize) -> Result<Vec<(f64, Option<KeyDist>)>, WorkloadError> {
        match (&self.keys, self.sticky) {
            (Some(keys), true) => Ok((0..targets)
                .map(|node| {
                    let (sub, mass) = keys.restricted(node, targets);
                    (self.rate * mass, Some(sub))
                })
                .collect()),
            (keys, _) => Ok(self
                .rates_per_target(targets)?
                .into_iter()
                .map(|rate| (rate, keys.clone()))
                .collect()),
        }
    }

    /// The request every call sends.
    pub fn request(&self) -> RateLimitRequest {
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: vec![RateLimitDescriptor {
                entries: self
                    .entries
                    .iter()
                    .map(|(key, value)| DescriptorEntry {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 1,
        }
    }

    /// The rate each of `targets` targets receives, by weight.
    pub fn rates_per_target(&self, targets: usize) -> Result<Vec<f64>, WorkloadError> {
        let weights = if self.weights.is_empty() {
            vec![1.0; targets]
        } else if self.weights.len() == targets {
            self.weights.clone()
        } else {
            return Err(WorkloadError::Invalid(format!(
                "{} weights for {targets} targets",
                self.weights.len()
            )));
        };
        let total: f64 = weights.iter().sum();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || total <= 0.0 {
            return Err(WorkloadError::Invalid(format!(
                "weights must be finite, non-negative, and not all zero: {weights:?}"
            )));
        }
        Ok(weights.iter().map(|w| self.rate * w / total).collect())
    }

    fn validate(&self, targets: usize) -> Result<(), WorkloadError> {
        if targets == 0 {
            return Err(WorkloadError::Invalid("no targets".into()));
        }
        if !self.rate.is_finite() || self.rate <= 0.0 {
            return Err(WorkloadError::Invalid(format!(
                "rate must be positive, got {}",
                self.rate
            )));
        }
        if self.sticky && self.keys.is_none() {
            return Err(WorkloadError::Invalid("sticky spread needs keys".into()));
        }
        if self
            .keys
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > crate::keys::MAX_KEYS)
        {
            return Err(WorkloadError::Invalid(format!(
                "between 1 and {} keys",
                crate::keys::MAX_KEYS
            )));
        }
        if self.streams_per_client == 0 || self.streams_per_client > 1_000 {
            return Err(WorkloadError::Invalid(
                "streams_per_client between 1 and 1,000".into(),
            ));
        }
        if self.clients_per_node == 0 {
            return Err(WorkloadError::Invalid(
                "clients_per_node must be at least 1".into(),
            ));
        }
        let planned = self.rate * self.duration.as_secs_f64();
        if planned > MAX_PLANNED_CALLS {
            return Err(WorkloadError::Invalid(format!(
                "{planned:.0} calls planned, more than the {MAX_PLANNED_CALLS:.0} allowed"
            )));
        }
        Ok(())
    }
}

/// What can stop a workload from running.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The workload makes no sense (no targets, zero rate, bad weights, too many calls).
    #[error("invalid workload: {0}")]
    Invalid(String),
    /// A client could not connect before the load started.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The target.
        addr: SocketAddr,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting took longer than `connect_timeout`.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// A client task panicked.
    #[error("a client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One client's share of the plan.
struct ClientPlan {
    /// Which target (node index) it calls.
    node: u32,
    /// Its own connection.
    client: RateLimitServiceClient<Channel>,
    /// Time between its calls.
    period: Duration,
    /// When its first call goes out (staggered).
    first: tokio::time::Instant,
    /// Its bound on the number of ticks (calls made plus calls skipped).
    max_ticks: usize,
    /// The keys it draws from; `None`: always request 0.
    keys: Option<KeyDist>,
    /// Its own seeded generator for the draws.
    rng: fastrand::Rng,
    /// Unpaced: call again as soon as answered.
    closed_loop: bool,
}

/// Offers `workload` to `targets` (gRPC addresses, in node order) and returns every call it
/// made, sorted by send time.
///
/// All clients connect before the clock starts; the load then runs for `workload.duration`.
pub async fn run(workload: &Workload, targets: &[SocketAddr]) -> Result<Load, WorkloadError> {
    workload.validate(targets.len())?;
    let per_target = workload.plan_targets(targets.len())?;
    let clients_total = per_target.iter().filter(|(r, _)| *r > 0.0).count()
        * workload.clients_per_node
        * workload.streams_per_client;

    let mut plans = Vec::with_capacity(clients_total);
    for (node, (&addr, (node_rate, keys))) in targets.iter().zip(&per_target).enumerate() {
        if *node_rate <= 0.0 {
            continue;
        }
        let loops = workload.clients_per_node * workload.streams_per_client;
        let client_rate = node_rate / loops as f64;
        for _ in 0..workload.clients_per_node {
            let client = connect(addr, workload.connect_timeout).await?;
            for _ in 0..workload.streams_per_client {
                plans.push((node as u32, client.clone(), client_rate, keys.clone()));
            }
        }
    }

    // Start a little ahead so that spawning every task does not eat into the first period.
    let soon = tokio::time::Instant::now() + Duration::from_millis(20);
    let start = match workload.start_at_us {
        Some(at) => {
            let wait = at.saturating_sub(unix_micros(SystemTime::now()));
            tokio::time::Instant::now() + Duration::from_micros(wait)
        }
        None => soon,
    }
    .max(soon);
    let deadline = start + workload.duration;
    let requests = std::sync::Arc::new(workload.requests());
    let mut tasks = Vec::with_capacity(plans.len());
    for (k, (node, client, client_rate, keys)) in plans.into_iter().enumerate() {
        let period = Duration::from_secs_f64(1.0 / client_rate);
        let plan = ClientPlan {
            node,
            client,
            period,
            first: start + period.mul_f64(k as f64 / clients_total as f64),
            max_ticks: (client_rate * workload.duration.as_secs_f64()).ceil() as usize,
            keys,
            rng: fastrand::Rng::with_seed(workload.seed.wrapping_add(k as u64)),
            closed_loop: workload.closed_loop,
        };
        tasks.push(tokio::spawn(client_loop(
            plan,
            requests.clone(),
            deadline,
            workload.request_timeout,
            workload.max_lag,
        )));
    }

    let mut load = Load::default();
    for task in tasks {
        let (observations, skipped) = task.await?;
        load.observations.extend(observations);
        load.skipped += skipped;
    }
    load.observations.sort_by_key(|o| o.sent_us);
    Ok(load)
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<RateLimitServiceClient<Channel>, WorkloadError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| WorkloadError::Connect { addr, source })?
        .tcp_nodelay(true)
        .connect_timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| WorkloadError::ConnectTimeout(addr))?
        .map_err(|source| WorkloadError::Connect { addr, source })?;
    Ok(RateLimitServiceClient::new(channel))
}

/// Whether a tick `queued` behind schedule is dropped instead of sent: more than `max_lag`
/// late, and more than its client's `period` late (a slower client's tick late by less than its
/// period is no backlog: the next tick is not due yet).
fn too_late(queued: Duration, max_lag: Duration, period: Duration) -> bool {
    queued > max_lag.max(period)
}

/// One client: a call per tick until the deadline or its tick budget, whichever comes first.
/// Returns the calls made and the number of ticks dropped for running behind.
async fn client_loop(
    mut plan: ClientPlan,
    requests: std::sync::Arc<Vec<RateLimitRequest>>,
    deadline: tokio::time::Instant,
    request_timeout: Duration,
    max_lag: Duration,
) -> (Vec<Observation>, u64) {
    let mut ticks = tokio::time::interval_at(plan.first, plan.period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // Bounded up front: a closed-loop budget can be far more calls than will be made.
    let mut out = Vec::with_capacity(plan.max_ticks.min(1 << 16));
    let mut skipped = 0u64;
    for _ in 0..plan.max_ticks {
        let queued = if plan.closed_loop {
            if tokio::time::Instant::now() < plan.first {
                tokio::time::sleep_until(plan.first).await;
            }
            Duration::ZERO
        } else {
            let Ok(scheduled) = tokio::time::timeout_at(deadline, ticks.tick()).await else {
                break;
            };
            tokio::time::Instant::now().saturating_duration_since(scheduled)
        };
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if too_late(queued, max_lag, plan.period) {
            skipped += 1;
            continue;
        }
        let key = plan.keys.as_ref().map_or(0, |d| d.sample(&mut plan.rng));
        let request = requests[key as usize].clone();
        let sent_us = unix_micros(SystemTime::now());
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(request_timeout, plan.client.should_rate_limit(request)).await;
        let latency = sent.elapsed();
        let received_us = unix_micros(SystemTime::now());
        let (outcome, error) = match answer {
            Ok(Ok(response)) => match Code::try_from(response.get_ref().overall_code) {
                Ok(Code::Ok) => (Outcome::Admitted, None),
                Ok(Code::OverLimit) => (Outcome::Rejected, None),
                _ => (Outcome::Error, Some(ErrorKind::Undecided)),
            },
            Ok(Err(status)) => (Outcome::Error, Some(error_kind(status.code()))),
            Err(_) => (Outcome::Error, Some(ErrorKind::Timeout)),
        };
        out.push(Observation {
            node: plan.node,
            key,
            queued_us: u64::try_from(queued.as_micros()).unwrap_or(u64::MAX),
            error,
            sent_us,
            received_us,
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            outcome,
        });
    }
    (out, skipped)
}

/// The kind of a failed call's gRPC status.
fn error_kind(code: tonic::Code) -> ErrorKind {
    match code {
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => ErrorKind::Timeout,
        _ => ErrorKind::Status,
    }
}

/// Microseconds since the Unix epoch (0 for a clock set before 1970).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(rate: f64) -> Workload {
        Workload::new(
            "bench",
            vec![("generic_key".into(), "bench".into())],
            rate,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn even_spread_by_default_and_weighted_on_request() {
        let w = workload(300.0);
        assert_eq!(w.rates_per_target(3).unwrap(), [100.0, 100.0, 100.0]);
        let mut w = workload(300.0);
        w.weights = vec![2.0, 1.0, 0.0];
        assert_eq!(w.rates_per_target(3).unwrap(), [200.0, 100.0, 0.0]);
        assert!(w.rates_per_target(2).is_err());
        w.weights = vec![0.0, 0.0, 0.0];
        assert!(w.rates_per_target(3).is_err());
        w.weights = vec![1.0, -1.0, 1.0];
        assert!(w.rates_per_target(3).is_err());
    }

    #[test]
    fn late_ticks_are_dropped_only_past_the_lag_cap_and_their_period() {
        let ms = Duration::from_millis;
        // A fast client (period 1 ms): the 20 ms cap decides.
        assert!(!too_late(ms(20), ms(20), ms(1)));
        assert!(too_late(ms(21), ms(20), ms(1)));
        // A slow client (a call every 1.8 s, 10/s over 18 clients): late by 50 ms or 1 s is
        // still one call, not a backlog; late by more than a period is.
        assert!(!too_late(ms(50), ms(20), ms(1800)));
        assert!(!too_late(ms(1800), ms(20), ms(1800)));
        assert!(too_late(ms(1801), ms(20), ms(1800)));
    }

    #[test]
    fn nonsense_workloads_are_refused() {
        assert!(workload(0.0).validate(1).is_err());
        assert!(workload(f64::NAN).validate(1).is_err());
        assert!(workload(10.0).validate(0).is_err());
        let mut w = workload(10.0);
        w.clients_per_node = 0;
        assert!(w.validate(1).is_err());
        let mut w = workload(1e9);
        w.duration = Duration::from_secs(3600);
        assert!(w.validate(1).is_err());
        assert!(workload(10.0).validate(3).is_ok());
    }

    #[test]
    fn the_request_carries_one_descriptor_with_the_entries() {
        let r = workload(1.0).request();
        assert_eq!(r.domain, "bench");
        assert_eq!(r.hits_addend, 1);
        assert_eq!(r.descriptors.len(), 1);
        let e = &r.descriptors[0].entries;
        assert_eq!(
            (e[0].key.as_str(), e[0].value.as_str()),
            ("generic_key", "bench")
        );
    }

    #[tokio::test]
    async fn an_unreachable_target_fails_to_connect() {
        // A port that was free a moment ago: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = run(&workload(10.0), &[addr]).await.unwrap_err();
        assert!(matches!(err, WorkloadError::Connect { .. }), "{err}");
    }
}
