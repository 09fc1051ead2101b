//! Commands that work on a cache directory rather than serve it:
//!
//! - [`ls`]: `berth ls`, cached images with digest, platforms, size, last
//!   use, pinned and complete flags. Read-only; safe beside a live daemon.
//! - [`verify`]: `berth verify`, re-hash every blob, quarantine mismatches,
//!   remove leftover temporary files.
//! - [`gc`]: `berth gc`, apply the retention period now.
//! - [`bundle`]: `berth export` / `berth import`, OCI image layout archives
//!   for air-gapped nodes (skopeo's `oci-archive:` reads and writes them).
//! - [`prefetch`]: `berth prefetch`, and the daemon's prefetch schedule.
//!
//! Shared here: [`image`] (references and walking an image in the cache),
//! [`listing`] (paginated tag and repository lists), [`progress`] (bars on a
//! terminal, log lines otherwise), logging, the lock, exit codes. Each
//! command receives the loaded [`Config`](crate::config::Config) and its own flags.
//!
//! Every command that changes the cache takes its lock first and refuses,
//! with a message saying so, while a daemon holds it.

pub mod bundle;
pub mod gc;
pub mod image;
pub mod listing;
pub mod ls;
pub mod prefetch;
pub mod progress;
pub mod verify;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::cache::store::{self, LockError};
use crate::telemetry::LogFormat;

/// Success.
pub const EXIT_OK: i32 = 0;
/// The command ran and found or hit a problem (corrupt blobs, a failed image).
pub const EXIT_FAILED: i32 = 1;
/// sysexits.h EX_USAGE: a bad command line or config.
pub const EXIT_USAGE: i32 = 64;
/// sysexits.h EX_TEMPFAIL: the cache is locked by a running daemon.
pub const EXIT_BUSY: i32 = 75;
/// Interrupted by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A flag or argument is wrong.
    #[error("{0}")]
    Usage(String),
    /// A running daemon holds the cache's lock.
    #[error("{0}{hint}", hint = .1)]
    Busy(LockError, &'static str),
    /// The lock file could not be taken for another reason.
    #[error("{0}")]
    Lock(LockError),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else, phrased for a person.
    #[error("{0}")]
    Failed(String),
}

impl AdminError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AdminError::Usage(_) => EXIT_USAGE,
            AdminError::Busy(..) => EXIT_BUSY,
            _ => EXIT_FAILED,
        }
    }

    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> AdminError {
        AdminError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Print an error the way every admin command does and return its exit code.
pub fn fail(e: &AdminError) -> i32 {
    eprintln!("berth: {e}");
    e.exit_code()
}

/// Refuse a directory that holds no berth cache.
pub fn is_cache(dir: &Path) -> Result<(), AdminError> {
    if dir.join("blobs/sha256").is_dir() {
        return Ok(());
    }
    Err(AdminError::Usage(format!(
        "{} is not a berth cache directory",
        dir.display()
    )))
}

/// Take the cache directory's lock for a command that changes it; `hint`
/// is appended to the refusal when a daemon holds it.
pub fn lock(dir: &Path, hint: &'static str) -> Result<File, AdminError> {
    match store::lock(dir) {
        Ok(f) => Ok(f),
        Err(e @ LockError::Busy(_)) => Err(AdminError::Busy(e, hint)),
        Err(e) => Err(AdminError::Lock(e)),
    }
}

/// Whether stderr is a terminal (progress bars) or a log (log lines).
pub use crate::telemetry::stderr_is_terminal;

/// Install logging for an admin command: `RUST_LOG` or `default_level`,
/// to stderr, through `writer` (which keeps progress bars intact).
pub fn init_logging(format: LogFormat, default_level: &str, writer: progress::LogWriter) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(crate::telemetry::colour());
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `12.3MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `5m ago`, coarse.
pub fn human_ago(secs: u64) -> String {
    match secs {
        0..60 => "just now".into(),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane_numbers() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
        assert_eq!(human_ago(5), "just now");
        assert_eq!(human_ago(7200), "2h ago");
        assert_eq!(human_ago(3 * 86400), "3d ago");
    }
}
