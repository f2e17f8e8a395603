//! Every strategy compiled into this build passes hivemind-core's conformance suite.

use std::sync::Arc;
use std::time::Duration;

use hivemind_core::{LocalCounters, Standalone, SystemClock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_conforms() {
    hivemind_core::testsuite::run_all(|| async {
        // The suite drives its own times (in 2023); a sweeper on the wall clock would drop its
        // counters as expired mid-check, so it sweeps rarely here.
        Standalone::new(
            Arc::new(LocalCounters::new(10_000)),
            Arc::new(SystemClock),
            Duration::from_secs(3_600),
        )
    })
    .await;
}
