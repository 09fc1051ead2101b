//! The `berth` binary: parse arguments, set up logging, load the config,
//! bind, and run the library until SIGTERM or Ctrl-C.

use clap::Parser;

use berth::cli::{Cli, Command, ServeArgs};
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

/// jemalloc instead of glibc's malloc. A cold download allocates a fresh
/// receive buffer for every upstream read (hyper, ~400 KiB) and frees it on
/// the hasher or writer thread; glibc returned those pages to the kernel and
/// faulted them in again, zeroed, for the next read (7 % of berth's CPU in
/// `perf`). jemalloc keeps freed pages for reuse (BENCHMARKS.md, "Cold path").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    use berth::{admin, node};
    let code = match Cli::parse().command {
        Command::Serve(a) => with_config(&a, run_serve),
        Command::Check(a) => with_config(&a.serve, |c| check(c, &a.flags.registries)),
        Command::Containerd(cmd) => node::run_containerd(&cmd),
        Command::K3s(a) => node::run_k3s(&a),
        Command::Ls(a) => with_config(&a.serve, |c| admin::ls::run(c, &a.flags)),
        Command::Verify(a) => with_config(&a, admin::verify::run),
        Command::Gc(a) => with_config(&a.serve, |c| admin::gc::run(c, &a.flags)),
        Command::Export(a) => with_config(&a.serve, |c| admin::bundle::export(c, &a.flags)),
        Command::Import(a) => with_config(&a.serve, |c| admin::bundle::import(c, &a.flags)),
        Command::Prefetch(a) => {
            with_config(&a.serve, |c| admin::prefetch::start::command(c, &a.flags))
        }
    };
    std::process::exit(code);
}

/// Load the config from the `serve` flags and file, then run `command`
/// with it; a bad config is reported and exits with 64.
fn with_config(args: &ServeArgs, command: impl FnOnce(Config) -> i32) -> i32 {
    match Config::from_args(args) {
        Ok(config) => command(config),
        Err(e) => {
            eprintln!("berth: invalid configuration: {e}");
            EX_USAGE
        }
    }
}

/// `berth serve`: log, bind, serve until SIGTERM or Ctrl-C.
fn run_serve(config: Config) -> i32 {
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
        // At once: dropping the runtime would wait for its blocking tasks.
        std::process::exit(1);
    }
    0
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
fn check(config: Config, registries: &[String]) -> i32 {
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
        let reports = berth::upstream::check::run(&upstreams, registries).await;
        if reports.is_empty() {
            eprintln!("berth: no configured registry matches {registries:?}");
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
