//! Progress of a long command: an indicatif bar when stderr is a terminal,
//! otherwise log lines (at most one every few seconds), so a service log or
//! a CI log gets progress without control characters.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often progress is logged when there is no bar.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A `tracing` writer that prints log lines above the progress bars
/// instead of through them.
#[derive(Clone, Default)]
pub struct LogWriter {
    multi: Option<MultiProgress>,
}

/// One log event, written when dropped.
pub struct LogLine {
    multi: Option<MultiProgress>,
    buf: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let out = || {
            let _ = std::io::stderr().write_all(&buf);
        };
        match &self.multi {
            Some(m) => m.suspend(out),
            None => out(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine {
            multi: self.multi.clone(),
            buf: Vec::new(),
        }
    }
}

/// Byte and item progress of one command.
pub struct Progress {
    what: &'static str,
    multi: Option<MultiProgress>,
    bar: Option<ProgressBar>,
    total: AtomicU64,
    done: AtomicU64,
    items_total: AtomicU64,
    items_done: AtomicU64,
    last_log: Mutex<Instant>,
}

impl Progress {
    /// Progress of `what` (`prefetch`, `verify`), with a bar when `terminal`.
    pub fn new(what: &'static str, terminal: bool) -> Arc<Progress> {
        let (multi, bar) = if terminal {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("progress template"),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            (Some(multi), Some(bar))
        } else {
            (None, None)
        };
        Arc::new(Progress {
            what,
            multi,
            bar,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            items_total: AtomicU64::new(0),
            items_done: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        })
    }

    /// A progress that neither draws nor logs (the daemon's own schedule
    /// logs per image instead).
    pub fn quiet(what: &'static str) -> Arc<Progress> {
        Progress::new(what, false)
    }

    /// The writer for log lines that must not tear the bars.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: self.multi.clone(),
        }
    }

    /// More bytes to do.
    pub fn add_bytes(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc_length(n);
        }
    }

    /// More items (images, files) to do.
    pub fn add_items(&self, n: u64) {
        self.items_total.fetch_add(n, Ordering::Relaxed);
        self.set_message();
    }

    /// Bytes done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        match &self.bar {
            Some(b) => b.inc(n),
            None => self.maybe_log(),
        }
    }

    /// One item finished; `line` is shown above the bar (or logged).
    pub fn item_done(&self, line: &str) {
        self.items_done.fetch_add(1, Ordering::Relaxed);
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => tracing::info!(what = self.what, "{line}"),
        }
        self.set_message();
    }

    /// Remove the bar (the summary follows on stdout).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// (bytes done, bytes total).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    fn set_message(&self) {
        if let Some(b) = &self.bar {
            b.set_message(format!(
                "{}/{}",
                self.items_done.load(Ordering::Relaxed),
                self.items_total.load(Ordering::Relaxed)
            ));
        }
    }

    fn maybe_log(&self) {
        let Ok(mut last) = self.last_log.try_lock() else {
            return;
        };
        if last.elapsed() < LOG_EVERY {
            return;
        }
        *last = Instant::now();
        let (done, total) = self.bytes();
        tracing::info!(
            what = self.what,
            bytes_done = done,
            bytes_total = total,
            items_done = self.items_done.load(Ordering::Relaxed),
            items_total = self.items_total.load(Ordering::Relaxed),
            "{} progress: {} of {}",
            self.what,
            super::human_bytes(done),
            super::human_bytes(total)
        );
    }
}
