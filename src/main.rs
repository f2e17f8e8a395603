//! The `hivemind` binary: flags → settings → [`hivemind::server::run`] until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hivemind::cli::Cli;
use hivemind::server::{self, Listeners};
use hivemind::settings::{Settings, SettingsFile, SETTINGS_ENV};
use hivemind_core::ListeningLine;

/// mimalloc instead of the system allocator: the gRPC path allocates a few small buffers per
/// call, and glibc malloc showed up as a tenth of the server's profile under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hivemind: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = SettingsFile::resolve(cli.settings.clone(), std::env::var_os(SETTINGS_ENV));
    let settings = Settings::load(&file, std::env::vars(), cli.flag_values())?;
    if cli.check_config {
        return Ok(check_config(&settings));
    }
    if cli.healthcheck {
        return Ok(healthcheck(&settings));
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    // The OTLP exporter and its batch task live on this runtime.
    let telemetry = {
        let _entered = runtime.enter();
        hivemind::telemetry::init(&settings.log, &settings.telemetry)
            .context("starting telemetry")?
    };
    let served = runtime.block_on(async {
        let listeners = Listeners::bind(&settings).await?;
        let (grpc, admin) = listeners.local_addrs().context("reading bound addresses")?;
        let mesh = listeners.mesh_addr();
        let strategy = settings.strategy.as_str();
        // One line on stdout that scripts and tests can wait for, once the server answers;
        // logs go to stderr.
        let ready = move || {
            println!("{}", ListeningLine { grpc, admin, mesh });
            tracing::info!(%grpc, %admin, strategy, "hivemind serving");
        };
        server::run_with_ready(settings, listeners, server::shutdown_signal(), ready).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Flush the spans still queued while the runtime that exports them runs (bounded).
    drop(telemetry);
    served
}

/// Probes the admin address of these settings: exit 0 if the server there is serving.
fn healthcheck(settings: &Settings) -> ExitCode {
    match hivemind::probe::healthcheck(settings.admin.addr, HEALTHCHECK_TIMEOUT) {
        Ok(answer) => {
            print!("{}", answer.body);
            if answer.serving() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "hivemind: no healthcheck answer from {}: {e}",
                hivemind::probe::probe_target(settings.admin.addr)
            );
            ExitCode::FAILURE
        }
    }
}

/// How long `--healthcheck` waits for each step of its request.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Prints the effective settings and validates the rules: exit 0 if both are good.
fn check_config(settings: &Settings) -> ExitCode {
    print!("{}", settings.to_yaml());
    match server::load_rules(settings) {
        Ok((rules, source)) => {
            println!(
                "# rules ok: {} domain(s) from {:?}, hash {}",
                rules.domains().count(),
                source,
                rules.hash()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hivemind: invalid rules: {e}");
            ExitCode::FAILURE
        }
    }
}
