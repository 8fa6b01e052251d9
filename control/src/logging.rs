//! Where and how `wgxdp` logs: tracing events on stderr, as human-readable
//! text (the default) or as one JSON object per line for log shippers
//! (`--log-format json` or `WGXDP_LOG_FORMAT=json`; the flag wins). The level
//! filter comes from `WGXDP_LOG` (tracing's env-filter syntax, default `info`).

use std::fmt::Display;

/// The environment variable that chooses the format when `--log-format` is not given.
pub const FORMAT_ENV: &str = "WGXDP_LOG_FORMAT";
/// The environment variable with the level filter.
pub const FILTER_ENV: &str = "WGXDP_LOG";

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), and the spans it happened in.
    Json,
}

/// Installs the global subscriber; call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // No colour codes inside JSON strings.
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Reports the error that ends the command: `wgxdp: error: …` on stderr in
/// text mode; in JSON mode an `error` event, so that everything on stderr is
/// in one format (unless the filter drops errors, when it is printed as text
/// rather than lost).
pub fn report_error(format: LogFormat, error: &dyn Display) {
    if format == LogFormat::Json && tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(error = %error, "wgxdp: the command failed");
    } else {
        eprintln!("wgxdp: error: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn formats_are_named_as_on_the_command_line() {
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
        assert_eq!(LogFormat::from_str("text", false), Ok(LogFormat::Text));
        assert!(LogFormat::from_str("xml", false).is_err());
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }
}
