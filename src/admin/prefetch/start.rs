//! How a prefetch starts: the daemon's schedule (`[prefetch] on_start`,
//! `interval`) and the one-shot `berth prefetch` command, with its signal
//! handling and clean-up of abandoned downloads.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{run, Options, Outcome};
use crate::admin::progress::Progress;
use crate::admin::{
    fail, init_logging, stderr_is_terminal, AdminError, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK,
};
use crate::cli::PrefetchArgs;
use crate::config::{parse_rate, Config};
use crate::state::AppState;

/// Start the daemon's prefetch: once at start (`on_start`) and every
/// `interval`, until `stop` resolves. Does nothing without rules or a
/// schedule.
pub fn spawn_schedule(state: &AppState, stop: impl Future<Output = ()> + Send + 'static) {
    let p = &state.config.prefetch;
    let opts = Options::from_config(&state.config);
    if opts.rules.is_empty() || (!p.on_start && p.interval.is_none()) {
        return;
    }
    let (on_start, interval) = (p.on_start, p.interval);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        stop.await;
        c.cancel();
    });
    let st = state.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            if on_start || !first {
                let started = Instant::now();
                tracing::info!(rules = ?opts.rules, "prefetch starting");
                let out = run(&st, &opts, &cancel, &Progress::quiet("prefetch")).await;
                tracing::info!(
                    images = out.fetched.len(),
                    failed = out.failed.len(),
                    cancelled = out.cancelled,
                    elapsed = ?started.elapsed(),
                    "prefetch finished"
                );
            }
            first = false;
            let Some(every) = interval else { break };
            if cancel
                .run_until_cancelled(tokio::time::sleep(every))
                .await
                .is_none()
            {
                break;
            }
        }
    });
}

/// `berth prefetch`: the one-shot command.
pub fn command(config: Config, args: &PrefetchArgs) -> i32 {
    let progress = Progress::new("prefetch", stderr_is_terminal());
    init_logging(config.log_format, "info", progress.log_writer());
    let opts = match options(args, &config) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(oneshot(config, opts, progress.clone()));
    rt.shutdown_timeout(Duration::from_secs(1));
    progress.finish();
    let out = match result {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    for f in &out.failed {
        println!("FAILED {}: {}", f.0, f.1);
    }
    let downloaded: usize = out.fetched.iter().map(|f| f.downloaded).sum();
    println!(
        "prefetched {} image(s), {} blob(s) downloaded, {} failed{}",
        out.fetched.len(),
        downloaded,
        out.failed.len(),
        if out.cancelled { "; interrupted" } else { "" }
    );
    if out.cancelled {
        EXIT_INTERRUPTED
    } else if !out.failed.is_empty() {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// The command's options: the config's, overridden by flags.
fn options(args: &PrefetchArgs, config: &Config) -> Result<Options, AdminError> {
    let mut o = Options::from_config(config);
    if o.rules.is_empty() {
        return Err(AdminError::Usage(
            "nothing to prefetch: add `[prefetch] images` or `pins` to the config, or pass --prefetch RULE".into(),
        ));
    }
    if args.all_platforms {
        o.platforms = vec!["all".into()];
    } else if !args.platforms.is_empty() {
        o.platforms = args.platforms.clone();
    }
    if let Some(c) = args.concurrency {
        o.concurrency = c.clamp(1, 64);
    }
    if let Some(b) = &args.bandwidth {
        o.bandwidth = Some(parse_rate(b).ok_or_else(|| {
            AdminError::Usage(format!(
                "--bandwidth {b:?}: expected a byte rate such as 20MiB (per second)"
            ))
        })?);
    }
    o.page_size = args.page_size.clamp(1, 10_000);
    Ok(o)
}

async fn oneshot(
    config: Config,
    opts: Options,
    progress: Arc<Progress>,
) -> Result<Outcome, AdminError> {
    let state = crate::build_state(config).map_err(|e| {
        match e.downcast::<crate::cache::store::LockError>() {
            Ok(l @ crate::cache::store::LockError::Busy(_)) => AdminError::Busy(
                l,
                ", or let the daemon prefetch: set `[prefetch] on_start = true` (and `interval`) in its config",
            ),
            Ok(l) => AdminError::Lock(l),
            Err(e) => AdminError::Failed(format!("{e:#}")),
        }
    })?;
    let cancel = CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            for n in 0.. {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if n > 0 {
                    eprintln!("berth: interrupted again; exiting now");
                    std::process::exit(EXIT_INTERRUPTED);
                }
                tracing::warn!("stopping prefetch: abandoning downloads in progress");
                cancel.cancel();
            }
        })
    };
    let out = run(&state, &opts, &cancel, &progress).await;
    // Downloads this run started end promptly once cancelled; wait for them
    // so that their temporary files are gone before the lock is released.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.mirror.cache.flights.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if out.cancelled {
        // The lock is ours: nothing else can be writing into tmp/.
        let tmp = state.mirror.cache.store.root().join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    watcher.abort();
    Ok(out)
}
