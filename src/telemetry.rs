//! Logging setup: `RUST_LOG`-style filter (default `info`), human text, one
//! JSON object per line with `--log-format json`. Colour codes only when
//! the log goes to a terminal and `NO_COLOR` is not set ([`colour`]): a log
//! written to a file (systemd, `kubectl logs`) stays plain text.

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global subscriber (once, from `main`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour());
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Whether stderr, where every log goes, is a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// The one decision whether log lines carry terminal colour codes:
/// [`colour_wanted`] for this process's stderr and `NO_COLOR`.
pub fn colour() -> bool {
    colour_wanted(
        std::env::var_os("NO_COLOR").as_deref(),
        stderr_is_terminal(),
    )
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to a
/// non-empty value (no-color.org: an empty value counts as unset).
pub fn colour_wanted(no_color: Option<&OsStr>, terminal: bool) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let set = Some(OsStr::new("1"));
        assert!(colour_wanted(None, true));
        assert!(colour_wanted(Some(OsStr::new("")), true), "empty = unset");
        assert!(!colour_wanted(set, true), "NO_COLOR=1 on a terminal");
        assert!(!colour_wanted(Some(OsStr::new("false")), true), "any value");
        assert!(!colour_wanted(None, false), "a file or a pipe");
        assert!(!colour_wanted(set, false));
    }
}
