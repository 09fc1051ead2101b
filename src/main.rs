//! The `berth` binary: parse arguments, set up logging, load the config,
//! bind, and run the library until SIGTERM or Ctrl-C.

use clap::Parser;

use berth::cli::{Cli, Command};
use berth::config::Config;

/// sysexits.h EX_USAGE: a bad command line or config.
const EX_USAGE: i32 = 64;

/// Tasks a busy worker runs between two looks at the I/O driver (tokio's
/// default is 61). While cold pulls keep both workers busy, a connection
/// that became readable (a cached manifest request) waits for that many
/// task polls first: measured with `benches/compare.py --only load`, the
/// cached-manifest p99 during 8 cold pulls fell from ~70 ms to ~25 ms with
/// 7, and nothing else moved (an `epoll_wait` with no timeout is cheap).
const EVENT_INTERVAL: u32 = 7;

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::from_args(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: invalid configuration: {e}");
                    std::process::exit(EX_USAGE);
                }
            };
            berth::telemetry::init(config.log_format);
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .event_interval(EVENT_INTERVAL)
                .build()
                .expect("tokio runtime");
            if let Err(e) = rt.block_on(serve(config)) {
                tracing::error!(error = format!("{e:#}"), "berth failed");
                eprintln!("berth: {e:#}");
                std::process::exit(1);
            }
        }
        Command::Check(args) => std::process::exit(check(&args)),
        Command::Containerd(cmd) => std::process::exit(berth::node::run_containerd(&cmd)),
        Command::K3s(args) => std::process::exit(berth::node::run_k3s(&args)),
        Command::Ls(args) => std::process::exit(berth::admin::ls::run(&args)),
        Command::Verify(args) => std::process::exit(berth::admin::verify::run(&args)),
        Command::Gc(args) => std::process::exit(berth::admin::gc::run(&args)),
        Command::Export(args) => std::process::exit(berth::admin::bundle::export(&args)),
        Command::Import(args) => std::process::exit(berth::admin::bundle::import(&args)),
        Command::Prefetch(args) => std::process::exit(berth::admin::prefetch::command(&args)),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting berth");
    let listen = config.listen;
    let metrics_listen = config.metrics_listen;
    let cache_dir = config.cache_dir.clone();
    for (host, reg) in &config.registries {
        for (i, ep) in reg.endpoints.iter().enumerate() {
            tracing::info!(registry = %host, order = i, endpoint = %berth::upstream::redact(&ep.url), hub = ep.hub, auth = ep.credentials.is_some(), "mirroring");
        }
    }
    let state = berth::build_state(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let metrics_listener = match metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))?,
        ),
        None => None,
    };
    tracing::info!(listen = %listener.local_addr()?, metrics = ?metrics_listen, cache_dir = %cache_dir.display(), "berth ready");
    berth::serve(state, listener, metrics_listener, shutdown_signal()).await;
    tracing::info!("berth stopped");
    Ok(())
}

/// `berth check`: exit 0 when every endpoint works, 1 otherwise, 64 on a bad config.
fn check(args: &berth::cli::CheckArgs) -> i32 {
    let config = match Config::from_args(&args.serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: invalid configuration: {e}");
            return EX_USAGE;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let metrics = berth::metrics::Metrics::register().expect("metrics");
        let upstreams = match berth::upstream::Upstreams::new(&config, &metrics) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("berth: {e}");
                return EX_USAGE;
            }
        };
        let reports = berth::upstream::check::run(&upstreams, &args.registries).await;
        if reports.is_empty() {
            eprintln!(
                "berth: no configured registry matches {:?}",
                args.registries
            );
            return EX_USAGE;
        }
        let (text, code) = berth::upstream::check::render(&reports);
        print!("{text}");
        code
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
