//! Logging setup (DESIGN §6 "Logs"): `tracing` to stderr, human or JSON,
//! filtered by `RUST_LOG` (default level from the configuration).
//!
//! `--debug-packets` raises only the proxy's packet logs (target
//! [`PACKET_TARGET`]) to debug level, whatever the rest of the filter says;
//! the proxy redacts bodies and credentials in them unless `--log-plaintext`.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// The target prefix of the proxy's per-frame logs (`proxy::connection`
/// logs every frame at debug level when packet logging is on).
pub const PACKET_TARGET: &str = "o2tr_proxy::proxy";

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected human or json".into()),
        }
    }
}

/// Builds the filter: `RUST_LOG` if set (and valid), else `default_level`;
/// plus `o2tr_proxy::proxy=debug` with `debug_packets`. Returns a warning to
/// log when `RUST_LOG` was invalid.
pub fn filter(
    rust_log: Option<&str>,
    default_level: &str,
    debug_packets: bool,
) -> (EnvFilter, Option<String>) {
    let fallback = || EnvFilter::try_new(default_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (mut f, warning) = match rust_log.filter(|s| !s.trim().is_empty()) {
        Some(s) => match EnvFilter::try_new(s) {
            Ok(f) => (f, None),
            Err(e) => (
                fallback(),
                Some(format!("ignoring invalid RUST_LOG {s:?}: {e}")),
            ),
        },
        None => (fallback(), None),
    };
    if debug_packets {
        if let Ok(d) = format!("{PACKET_TARGET}=debug").parse() {
            f = f.add_directive(d);
        }
    }
    (f, warning)
}

/// Installs the global subscriber writing to stderr (colours only when
/// stderr is a terminal). A second call does nothing.
pub fn init(format: LogFormat, default_level: &str, debug_packets: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, warning) = filter(rust_log.as_deref(), default_level, debug_packets);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_packets_only_raises_the_proxy() {
        let (f, w) = filter(None, "info", true);
        assert!(w.is_none());
        let s = f.to_string();
        assert!(s.contains("o2tr_proxy::proxy=debug"), "{s}");
        assert!(s.contains("info"), "{s}");
        let (f, _) = filter(Some("warn"), "info", false);
        assert_eq!(f.to_string(), "warn");
        let (_, w) = filter(Some("foo=bogus"), "info", false);
        assert!(w.is_some());
    }

    #[test]
    fn formats() {
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
