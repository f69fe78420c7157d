//! Configuration of `o2tr-proxy run` (DESIGN §6 "CLI"): one set of keys
//! read from four layers, validated once before anything starts.
//!
//! Precedence, highest first: command-line flags, `O2TR_*` environment
//! variables, the TOML file, built-in defaults. Every key has the same name
//! in each layer: TOML key `max_stanza_bytes`, flag `--max-stanza-bytes`,
//! variable `O2TR_MAX_STANZA_BYTES` (see [`KEYS`]).
//!
//! [`resolve`] merges the layers and checks everything that can be checked
//! without starting: addresses parse, certificate and key files are readable
//! and match, the state directory (if it exists) is private, a plaintext
//! client leg only on loopback. Each failure is one [`ConfigError`] whose
//! message names the key and where its value came from. Nothing is created
//! on disk here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs;
use crate::otr::policy::Policy;
use crate::proxy::{HookFactory, ProxyConfig};
use crate::router::RouterConfig;
use crate::telemetry::LogFormat;

/// Prefix of the environment variables.
pub const ENV_PREFIX: &str = "O2TR_";
/// Environment variable naming the TOML file (like `--config`).
pub const ENV_CONFIG: &str = "O2TR_CONFIG";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5222";
/// Name of the program's directories (state, configuration).
pub const APP_DIR: &str = "o2tr-proxy";

/// Every configuration key, in the order they are printed.
pub const KEYS: &[&str] = &[
    "listen",
    "upstream",
    "upstream_ca",
    "upstream_insecure",
    "dns_server",
    "upstream_sm",
    "upstream_ping_secs",
    "upstream_ping_timeout_secs",
    "tls_cert",
    "tls_key",
    "allow_plaintext_client",
    "state_dir",
    "policy",
    "max_stanza_bytes",
    "max_connections",
    "fragment_size",
    "heartbeat_secs",
    "max_unanswered",
    "snapshot_lifetime_secs",
    "control_jid",
    "debug_packets",
    "log_plaintext",
    "log_format",
    "log_level",
];

/// The environment variable of a key (`max_stanza_bytes` →
/// `O2TR_MAX_STANZA_BYTES`).
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// The flag of a key (`max_stanza_bytes` → `--max-stanza-bytes`).
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// One layer of settings, every key optional. This is also the TOML file's
/// schema: unknown keys are an error.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address the proxy listens on for clients.
    pub listen: Option<String>,
    /// Fixed upstream `HOST:PORT` (otherwise SRV, then the domain on 5222).
    pub upstream: Option<String>,
    /// PEM file of CA certificates trusted for the upstream server.
    pub upstream_ca: Option<PathBuf>,
    /// Do not verify the upstream certificate.
    pub upstream_insecure: Option<bool>,
    /// DNS server (`IP` or `IP:PORT`) for the upstream SRV lookup, instead
    /// of the system's resolver configuration.
    pub dns_server: Option<String>,
    /// XEP-0198 stream management on the upstream leg.
    pub upstream_sm: Option<bool>,
    /// Ping a silent upstream after this many seconds (0 = never).
    pub upstream_ping_secs: Option<u64>,
    /// Give up on an upstream that answers no ping within this many seconds.
    pub upstream_ping_timeout_secs: Option<u64>,
    /// PEM certificate chain offered to clients.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Allow clients without TLS (loopback listener only).
    pub allow_plaintext_client: Option<bool>,
    /// Directory of the store (keys, trust, snapshots) and `certs/`.
    pub state_dir: Option<PathBuf>,
    /// Default OTR policy: manual, opportunistic or always.
    pub policy: Option<String>,
    /// Largest stanza accepted on either leg, in bytes.
    pub max_stanza_bytes: Option<usize>,
    /// Largest number of concurrent client connections.
    pub max_connections: Option<usize>,
    /// Fragment OTR messages longer than this many bytes (0 = never).
    pub fragment_size: Option<usize>,
    /// Heartbeat interval in seconds (0 = off).
    pub heartbeat_secs: Option<u64>,
    /// The O2TR bound on messages sent without an answer.
    pub max_unanswered: Option<u32>,
    /// How long an EKM snapshot is kept, in seconds.
    pub snapshot_lifetime_secs: Option<u64>,
    /// JID of the control contact.
    pub control_jid: Option<String>,
    /// Log every stanza in both directions (redacted).
    pub debug_packets: Option<bool>,
    /// With `debug_packets`: do not redact bodies and credentials.
    pub log_plaintext: Option<bool>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// Default log filter when `RUST_LOG` is unset (e.g. `info`).
    pub log_level: Option<String>,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An `O2TR_*` environment variable.
    Env,
    /// The TOML file.
    File(PathBuf),
    /// The built-in default.
    Default,
}

impl Source {
    /// Describes the source of `key`, e.g. `--listen`, `O2TR_LISTEN`,
    /// `listen in /etc/o2tr.toml`, `default`.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Source::Flag => flag_name(key),
            Source::Env => env_name(key),
            Source::File(p) => format!("{key} in {}", p.display()),
            Source::Default => "default".into(),
        }
    }
}

/// Why the configuration was refused. Each message is one line naming the
/// key or file concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for our schema (unknown key,
    /// wrong type, …).
    #[error("configuration file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// An environment variable has an unusable value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid {key} {value:?} (from {origin}): {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// Where it came from ([`Source::describe`]).
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A file named by a key cannot be used.
    #[error("{key} ({origin}): cannot use {path}: {message}")]
    File {
        /// The key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Where the key came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// Only one of `tls_cert` and `tls_key` was given.
    #[error("{given} was given without {missing}: give both or neither")]
    TlsPair {
        /// The flag given.
        given: String,
        /// The flag missing.
        missing: String,
    },
    /// No certificate for the client leg and plaintext not allowed.
    #[error(
        "no TLS certificate for the client leg: run `o2tr-proxy certs --domain YOUR.DOMAIN` \
         (writes {certs_dir}), or pass --tls-cert and --tls-key, or allow a plaintext client \
         leg on loopback with --allow-plaintext-client"
    )]
    NoClientTls {
        /// Where `certs` would write its files.
        certs_dir: PathBuf,
    },
    /// A plaintext client leg was asked for on a non-loopback address.
    #[error(
        "allow_plaintext_client ({origin}) is refused on the non-loopback listen address {listen}: \
         listen on 127.0.0.1 or ::1, or use TLS"
    )]
    PlaintextNotLoopback {
        /// The listen address.
        listen: SocketAddr,
        /// Where `allow_plaintext_client` came from.
        origin: String,
    },
    /// The state directory is not a private directory.
    #[error("state_dir ({origin}): refusing to use {path}: {message}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Where it came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// No default state directory could be determined (no home directory).
    #[error("no state directory: set --state-dir, O2TR_STATE_DIR or XDG_DATA_HOME")]
    NoStateDir,
}

/// How the client leg is secured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientTls {
    /// STARTTLS with these PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
        /// Found in `<state_dir>/certs` rather than configured.
        from_state_dir: bool,
    },
    /// No TLS (allowed on loopback only).
    Plaintext,
}

/// The validated configuration of `run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Fixed upstream.
    pub upstream: Option<(String, u16)>,
    /// Upstream CA file.
    pub upstream_ca: Option<PathBuf>,
    /// Skip upstream certificate verification.
    pub upstream_insecure: bool,
    /// DNS server for the upstream lookup (`None`: the system's).
    pub dns_server: Option<SocketAddr>,
    /// Upstream stream management.
    pub upstream_sm: bool,
    /// Idle seconds before pinging the upstream (0 = never).
    pub upstream_ping_secs: u64,
    /// Seconds a ping may go unanswered.
    pub upstream_ping_timeout_secs: u64,
    /// Client leg security.
    pub client_tls: ClientTls,
    /// Whether plaintext clients were allowed by the user.
    pub allow_plaintext_client: bool,
    /// State directory.
    pub state_dir: PathBuf,
    /// Default OTR policy.
    pub policy: Policy,
    /// Maximum stanza size.
    pub max_stanza_bytes: usize,
    /// Maximum concurrent connections.
    pub max_connections: usize,
    /// Fragment size (0 = never).
    pub fragment_size: usize,
    /// Heartbeat interval (0 = off).
    pub heartbeat_secs: u64,
    /// O2TR bound `k`.
    pub max_unanswered: u32,
    /// Snapshot lifetime.
    pub snapshot_lifetime_secs: u64,
    /// Control contact.
    pub control_jid: String,
    /// Packet logging.
    pub debug_packets: bool,
    /// Unredacted packet logging.
    pub log_plaintext: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Default log filter.
    pub log_level: String,
    /// The configuration file read, if any.
    pub config_file: Option<PathBuf>,
    /// Where each key's value came from.
    pub sources: BTreeMap<&'static str, Source>,
}

/// The default state directory: `$XDG_DATA_HOME/o2tr-proxy`, else
/// `~/.local/share/o2tr-proxy` (the platform data directory elsewhere).
pub fn default_state_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join(APP_DIR))
}

/// The default configuration file: `$XDG_CONFIG_HOME/o2tr-proxy/config.toml`
/// (read only if it exists).
pub fn default_config_file() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join(APP_DIR).join("config.toml"))
}

/// Reads and parses a TOML configuration file.
pub fn load_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text).map_err(|message| ConfigError::ParseFile {
        path: path.to_owned(),
        message,
    })
}

/// Parses TOML text; the error is one line naming the key (and position).
pub fn parse_toml(text: &str) -> Result<RawConfig, String> {
    basic_toml::from_str(text).map_err(|e| one_line(&e.to_string()))
}

fn one_line(s: &str) -> String {
    let mut out = String::new();
    for part in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Drop the source excerpt lines (`1 | foo = 1`, `  ^^^`).
        if part.starts_with('|') || part.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(part);
    }
    out
}

/// The file to read: `explicit` (flag), else `O2TR_CONFIG`, else the
/// default file if it exists. The flag and variable must name a file that
/// exists.
pub fn config_file_path(
    explicit: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(p) = env(ENV_CONFIG) {
        return Some(PathBuf::from(p));
    }
    default_config_file().filter(|p| p.is_file())
}

/// Reads the `O2TR_*` variables through `env` (empty values count as unset).
pub fn raw_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
    let get = |key: &str| env(&env_name(key)).filter(|v| !v.is_empty());
    let path = |key: &str| get(key).map(PathBuf::from);
    fn num<T: FromStr>(var: String, v: Option<String>) -> Result<Option<T>, ConfigError> {
        v.map(|v| {
            v.trim().parse::<T>().map_err(|_| ConfigError::Env {
                var,
                message: format!("expected a non-negative integer, got {v:?}"),
            })
        })
        .transpose()
    }
    let boolean = |key: &str| -> Result<Option<bool>, ConfigError> {
        get(key)
            .map(|v| {
                parse_bool(&v).ok_or_else(|| ConfigError::Env {
                    var: env_name(key),
                    message: format!("expected true/false (or 1/0, yes/no, on/off), got {v:?}"),
                })
            })
            .transpose()
    };
    let n = |key: &str| (env_name(key), get(key));
    Ok(RawConfig {
        listen: get("listen"),
        upstream: get("upstream"),
        upstream_ca: path("upstream_ca"),
        upstream_insecure: boolean("upstream_insecure")?,
        dns_server: get("dns_server"),
        upstream_sm: boolean("upstream_sm")?,
        upstream_ping_secs: {
            let (v, x) = n("upstream_ping_secs");
            num(v, x)?
        },
        upstream_ping_timeout_secs: {
            let (v, x) = n("upstream_ping_timeout_secs");
            num(v, x)?
        },
        tls_cert: path("tls_cert"),
        tls_key: path("tls_key"),
        allow_plaintext_client: boolean("allow_plaintext_client")?,
        state_dir: path("state_dir"),
        policy: get("policy"),
        max_stanza_bytes: {
            let (v, x) = n("max_stanza_bytes");
            num(v, x)?
        },
        max_connections: {
            let (v, x) = n("max_connections");
            num(v, x)?
        },
        fragment_size: {
            let (v, x) = n("fragment_size");
            num(v, x)?
        },
        heartbeat_secs: {
            let (v, x) = n("heartbeat_secs");
            num(v, x)?
        },
        max_unanswered: {
            let (v, x) = n("max_unanswered");
            num(v, x)?
        },
        snapshot_lifetime_secs: {
            let (v, x) = n("snapshot_lifetime_secs");
            num(v, x)?
        },
        control_jid: get("control_jid"),
        debug_packets: boolean("debug_packets")?,
        log_plaintext: boolean("log_plaintext")?,
        log_format: get("log_format"),
        log_level: get("log_level"),
    })
}

/// Parses a boolean the way users write them.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" => Some(true),
        "0" | "false" | "no" | "off" | "n" => Some(false),
        _ => None,
    }
}

/// The three user layers, highest precedence first.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// From flags.
    pub flags: RawConfig,
    /// From `O2TR_*` variables.
    pub env: RawConfig,
    /// From the TOML file, with its path.
    pub file: Option<(PathBuf, RawConfig)>,
}

impl Layers {
    /// The first layer that sets a key, with its source.
    fn pick<T: Clone>(&self, f: impl Fn(&RawConfig) -> Option<T>) -> Option<(T, Source)> {
        if let Some(v) = f(&self.flags) {
            return Some((v, Source::Flag));
        }
        if let Some(v) = f(&self.env) {
            return Some((v, Source::Env));
        }
        if let Some((p, raw)) = &self.file {
            if let Some(v) = f(raw) {
                return Some((v, Source::File(p.clone())));
            }
        }
        None
    }

    /// The state directory alone (for the subcommands other than `run`).
    pub fn state_dir(&self) -> Result<(PathBuf, Source), ConfigError> {
        match self.pick(|r| r.state_dir.clone()) {
            Some(v) => Ok(v),
            None => default_state_dir()
                .map(|d| (d, Source::Default))
                .ok_or(ConfigError::NoStateDir),
        }
    }
}

/// Merges and validates the layers (see the module docs). Reads the
/// certificate files but creates nothing.
pub fn resolve(layers: &Layers) -> Result<Config, ConfigError> {
    let mut sources = BTreeMap::new();
    macro_rules! get {
        ($key:ident, $default:expr) => {{
            match layers.pick(|r| r.$key.clone()) {
                Some((v, s)) => {
                    sources.insert(stringify!($key), s);
                    v
                }
                None => {
                    sources.insert(stringify!($key), Source::Default);
                    $default
                }
            }
        }};
    }
    macro_rules! get_opt {
        ($key:ident) => {{
            match layers.pick(|r| r.$key.clone()) {
                Some((v, s)) => {
                    sources.insert(stringify!($key), s);
                    Some(v)
                }
                None => {
                    sources.insert(stringify!($key), Source::Default);
                    None
                }
            }
        }};
    }
    let invalid = |key: &'static str, value: &str, src: &BTreeMap<&str, Source>, msg: String| {
        ConfigError::Invalid {
            key,
            value: value.to_owned(),
            origin: origin(src, key),
            message: msg,
        }
    };

    let listen_s: String = get!(listen, DEFAULT_LISTEN.to_owned());
    let listen = parse_listen(&listen_s).map_err(|m| invalid("listen", &listen_s, &sources, m))?;

    let upstream_s: Option<String> = get_opt!(upstream);
    let upstream = match &upstream_s {
        Some(s) => Some(parse_host_port(s).map_err(|m| invalid("upstream", s, &sources, m))?),
        None => None,
    };

    let dns_s: Option<String> = get_opt!(dns_server);
    let dns_server = match &dns_s {
        Some(s) => Some(parse_dns_server(s).map_err(|m| invalid("dns_server", s, &sources, m))?),
        None => None,
    };

    let upstream_ca: Option<PathBuf> = get_opt!(upstream_ca);
    if let Some(p) = &upstream_ca {
        check_ca_file(p).map_err(|m| file_err("upstream_ca", p, &sources, m))?;
    }
    let upstream_insecure = get!(upstream_insecure, false);
    let upstream_sm = get!(upstream_sm, ProxyConfig::new().upstream_sm);
    let upstream_ping_secs = get!(
        upstream_ping_secs,
        crate::proxy::DEFAULT_UPSTREAM_PING_INTERVAL.as_secs()
    );
    let upstream_ping_timeout_secs = get!(
        upstream_ping_timeout_secs,
        crate::proxy::DEFAULT_UPSTREAM_PING_TIMEOUT.as_secs()
    );
    if upstream_ping_timeout_secs == 0 {
        return Err(invalid(
            "upstream_ping_timeout_secs",
            "0",
            &sources,
            "must be at least 1 (turn pings off with upstream_ping_secs = 0)".into(),
        ));
    }

    let state_dir: PathBuf = match layers.pick(|r| r.state_dir.clone()) {
        Some((v, s)) => {
            sources.insert("state_dir", s);
            v
        }
        None => {
            sources.insert("state_dir", Source::Default);
            default_state_dir().ok_or(ConfigError::NoStateDir)?
        }
    };
    check_state_dir(&state_dir).map_err(|message| ConfigError::StateDir {
        path: state_dir.clone(),
        origin: origin(&sources, "state_dir"),
        message,
    })?;

    let tls_cert: Option<PathBuf> = get_opt!(tls_cert);
    let tls_key: Option<PathBuf> = get_opt!(tls_key);
    let allow_plaintext_client = get!(allow_plaintext_client, false);
    let client_tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            check_cert_key(&cert, &key, &sources)?;
            ClientTls::Files {
                cert,
                key,
                from_state_dir: false,
            }
        }
        (Some(_), None) => {
            return Err(ConfigError::TlsPair {
                given: origin(&sources, "tls_cert"),
                missing: "tls_key (--tls-key)".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::TlsPair {
                given: origin(&sources, "tls_key"),
                missing: "tls_cert (--tls-cert)".into(),
            });
        }
        (None, None) => {
            let dir = state_dir.join(certs::CERTS_DIR);
            match certs::find(&dir) {
                Some((cert, key)) => {
                    check_cert_key(&cert, &key, &sources)?;
                    ClientTls::Files {
                        cert,
                        key,
                        from_state_dir: true,
                    }
                }
                None if allow_plaintext_client => ClientTls::Plaintext,
                None => return Err(ConfigError::NoClientTls { certs_dir: dir }),
            }
        }
    };
    if client_tls == ClientTls::Plaintext && !listen.ip().is_loopback() {
        return Err(ConfigError::PlaintextNotLoopback {
            listen,
            origin: origin(&sources, "allow_plaintext_client"),
        });
    }

    let policy_s: String = get!(policy, Policy::Always.to_string());
    let policy = policy_s
        .parse::<Policy>()
        .map_err(|e| invalid("policy", &policy_s, &sources, e.to_string()))?;

    let defaults = RouterConfig::default();
    let max_stanza_bytes = get!(
        max_stanza_bytes,
        crate::xmpp::framer::DEFAULT_MAX_STANZA_BYTES
    );
    if max_stanza_bytes < 4096 {
        return Err(invalid(
            "max_stanza_bytes",
            &max_stanza_bytes.to_string(),
            &sources,
            "must be at least 4096".into(),
        ));
    }
    let max_connections = get!(max_connections, ProxyConfig::new().max_connections);
    if max_connections == 0 {
        return Err(invalid(
            "max_connections",
            "0",
            &sources,
            "must be at least 1".into(),
        ));
    }
    let fragment_size = get!(fragment_size, defaults.fragment_size);
    if fragment_size != 0 && fragment_size < MIN_FRAGMENT_SIZE {
        return Err(invalid(
            "fragment_size",
            &fragment_size.to_string(),
            &sources,
            format!("must be 0 (never fragment) or at least {MIN_FRAGMENT_SIZE}"),
        ));
    }
    let heartbeat_secs = get!(heartbeat_secs, defaults.heartbeat_secs);
    let max_unanswered = get!(max_unanswered, defaults.max_unanswered);
    if max_unanswered == 0 {
        return Err(invalid(
            "max_unanswered",
            "0",
            &sources,
            "must be at least 1".into(),
        ));
    }
    let snapshot_lifetime_secs = get!(snapshot_lifetime_secs, defaults.snapshot_lifetime_secs);
    let control_jid: String = get!(control_jid, defaults.control_jid.clone());
    match crate::xmpp::jid::Jid::parse(&control_jid) {
        Ok(j) if !j.is_full() && j.local().is_some() => {}
        Ok(_) => {
            return Err(invalid(
                "control_jid",
                &control_jid,
                &sources,
                "must be a bare JID like control@o2tr.localhost".into(),
            ));
        }
        Err(e) => {
            return Err(invalid(
                "control_jid",
                &control_jid,
                &sources,
                e.to_string(),
            ));
        }
    }
    let debug_packets = get!(debug_packets, false);
    let log_plaintext = get!(log_plaintext, false);
    let log_format_s: String = get!(log_format, "human".to_owned());
    let log_format = log_format_s
        .parse::<LogFormat>()
        .map_err(|e| invalid("log_format", &log_format_s, &sources, e))?;
    let log_level: String = get!(log_level, "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        return Err(invalid("log_level", &log_level, &sources, e.to_string()));
    }

    Ok(Config {
        listen,
        upstream,
        upstream_ca,
        upstream_insecure,
        dns_server,
        upstream_sm,
        upstream_ping_secs,
        upstream_ping_timeout_secs,
        client_tls,
        allow_plaintext_client,
        state_dir,
        policy,
        max_stanza_bytes,
        max_connections,
        fragment_size,
        heartbeat_secs,
        max_unanswered,
        snapshot_lifetime_secs,
        control_jid,
        debug_packets,
        log_plaintext,
        log_format,
        log_level,
        config_file: layers.file.as_ref().map(|(p, _)| p.clone()),
        sources,
    })
}

/// Smallest useful fragment size (an OTR fragment header is about 40 bytes).
pub const MIN_FRAGMENT_SIZE: usize = 100;

fn origin(sources: &BTreeMap<&str, Source>, key: &str) -> String {
    sources
        .get(key)
        .map_or_else(|| flag_name(key), |s| s.describe(key))
}

fn file_err(
    key: &'static str,
    path: &Path,
    sources: &BTreeMap<&str, Source>,
    message: String,
) -> ConfigError {
    ConfigError::File {
        key,
        path: path.to_owned(),
        origin: origin(sources, key),
        message,
    }
}

/// Parses a listen address: `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse::<SocketAddr>()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:5222 or [::1]:5222".to_owned())
}

/// Parses a DNS server address: `IP` (port 53) or `IP:PORT` (`[V6]:PORT`).
pub fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| "expected an IP address, optionally with :PORT".to_owned())
}

/// Parses `HOST:PORT` (`[IPv6]:PORT` for IPv6 literals).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    const HINT: &str = "expected HOST:PORT, e.g. xmpp.example.org:5222";
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or(HINT)?;
        h.parse::<IpAddr>().map_err(|_| HINT.to_owned())?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or(HINT)?;
        if h.contains(':') {
            return Err(HINT.to_owned());
        }
        (h, p)
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
    {
        return Err(HINT.to_owned());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port {port:?}: {HINT}"))?;
    Ok((host.to_owned(), port))
}

fn check_ca_file(path: &Path) -> Result<(), String> {
    std::fs::File::open(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(())
}

fn check_cert_key(
    cert: &Path,
    key: &Path,
    sources: &BTreeMap<&str, Source>,
) -> Result<(), ConfigError> {
    std::fs::File::open(cert).map_err(|e| file_err("tls_cert", cert, sources, e.to_string()))?;
    std::fs::File::open(key).map_err(|e| file_err("tls_key", key, sources, e.to_string()))?;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err("tls_cert", cert, sources, format!("not a PEM file: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(
            "tls_cert",
            cert,
            sources,
            "no certificate in the file".into(),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        file_err(
            "tls_key",
            key,
            sources,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|e| {
            file_err(
                "tls_key",
                key,
                sources,
                format!("does not fit {}: {e}", cert.display()),
            )
        })?;
    Ok(())
}

/// Checks an existing state directory the way the store will: a directory,
/// not writable by group or others. A missing one is fine (created 0700).
pub fn check_state_dir(path: &Path) -> Result<(), String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(format!(
                "its mode {mode:04o} lets other users modify it (expected 0700; fix with chmod 700)"
            ));
        }
    }
    Ok(())
}

impl Config {
    /// The proxy's settings, with `hooks` as the message hook.
    pub fn proxy_config(&self, hooks: Arc<dyn HookFactory>) -> ProxyConfig {
        let (tls_cert, tls_key) = match &self.client_tls {
            ClientTls::Files { cert, key, .. } => (Some(cert.clone()), Some(key.clone())),
            ClientTls::Plaintext => (None, None),
        };
        ProxyConfig {
            listen: self.listen,
            upstream: self.upstream.clone(),
            upstream_ca: self.upstream_ca.clone(),
            dangerous_upstream_insecure: self.upstream_insecure,
            dns_server: self.dns_server,
            tls_cert,
            tls_key,
            allow_plaintext_client: self.client_tls == ClientTls::Plaintext,
            max_stanza_bytes: self.max_stanza_bytes,
            max_connections: self.max_connections,
            debug_packets: self.debug_packets,
            log_plaintext: self.log_plaintext,
            upstream_sm: self.upstream_sm,
            upstream_ping_interval: std::time::Duration::from_secs(self.upstream_ping_secs),
            upstream_ping_timeout: std::time::Duration::from_secs(self.upstream_ping_timeout_secs),
            hooks,
        }
    }

    /// The router's settings.
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            policy: self.policy,
            fragment_size: self.fragment_size,
            heartbeat_secs: self.heartbeat_secs,
            max_unanswered: self.max_unanswered,
            snapshot_lifetime_secs: self.snapshot_lifetime_secs,
            control_jid: self.control_jid.clone(),
            ..RouterConfig::default()
        }
    }

    /// The effective configuration as TOML, each line commented with where
    /// its value came from (for `run --check-config`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(p) = &self.config_file {
            out.push_str(&format!("# configuration file: {}\n", p.display()));
        }
        let path = |p: &Path| toml_str(&p.display().to_string());
        let opt_path = |p: &Option<PathBuf>| p.as_deref().map(path);
        let (cert, key) = match &self.client_tls {
            ClientTls::Files { cert, key, .. } => (Some(path(cert)), Some(path(key))),
            ClientTls::Plaintext => (None, None),
        };
        let values: Vec<(&str, Option<String>)> = vec![
            ("listen", Some(toml_str(&self.listen.to_string()))),
            (
                "upstream",
                self.upstream
                    .as_ref()
                    .map(|(h, p)| toml_str(&join_host_port(h, *p))),
            ),
            ("upstream_ca", opt_path(&self.upstream_ca)),
            (
                "upstream_insecure",
                Some(self.upstream_insecure.to_string()),
            ),
            (
                "dns_server",
                self.dns_server.map(|a| toml_str(&a.to_string())),
            ),
            ("upstream_sm", Some(self.upstream_sm.to_string())),
            (
                "upstream_ping_secs",
                Some(self.upstream_ping_secs.to_string()),
            ),
            (
                "upstream_ping_timeout_secs",
                Some(self.upstream_ping_timeout_secs.to_string()),
            ),
            ("tls_cert", cert),
            ("tls_key", key),
            (
                "allow_plaintext_client",
                Some(self.allow_plaintext_client.to_string()),
            ),
            ("state_dir", Some(path(&self.state_dir))),
            ("policy", Some(toml_str(&self.policy.to_string()))),
            ("max_stanza_bytes", Some(self.max_stanza_bytes.to_string())),
            ("max_connections", Some(self.max_connections.to_string())),
            ("fragment_size", Some(self.fragment_size.to_string())),
            ("heartbeat_secs", Some(self.heartbeat_secs.to_string())),
            ("max_unanswered", Some(self.max_unanswered.to_string())),
            (
                "snapshot_lifetime_secs",
                Some(self.snapshot_lifetime_secs.to_string()),
            ),
            ("control_jid", Some(toml_str(&self.control_jid))),
            ("debug_packets", Some(self.debug_packets.to_string())),
            ("log_plaintext", Some(self.log_plaintext.to_string())),
            ("log_format", Some(toml_str(&self.log_format.to_string()))),
            ("log_level", Some(toml_str(&self.log_level))),
        ];
        for (key, value) in values {
            let mut src = self
                .sources
                .get(key)
                .map_or_else(|| "default".to_owned(), |s| s.describe(key));
            if matches!(
                (key, &self.client_tls),
                (
                    "tls_cert" | "tls_key",
                    ClientTls::Files {
                        from_state_dir: true,
                        ..
                    }
                )
            ) {
                src = "found in state_dir/certs".into();
            }
            match value {
                Some(v) => out.push_str(&format!("{key} = {v}  # {src}\n")),
                None => out.push_str(&format!("# {key} unset  # {src}\n")),
            }
        }
        out
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env => f.write_str("environment"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Default => f.write_str("default"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(flags: RawConfig, env: RawConfig, file: Option<RawConfig>) -> Layers {
        Layers {
            flags,
            env,
            file: file.map(|f| (PathBuf::from("/cfg.toml"), f)),
        }
    }

    fn base() -> RawConfig {
        RawConfig {
            allow_plaintext_client: Some(true),
            state_dir: Some(PathBuf::from("/nonexistent/o2tr-test-state")),
            ..RawConfig::default()
        }
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let file = RawConfig {
            listen: Some("127.0.0.1:1".into()),
            policy: Some("manual".into()),
            fragment_size: Some(300),
            ..base()
        };
        let env = RawConfig {
            listen: Some("127.0.0.1:2".into()),
            policy: Some("opportunistic".into()),
            ..RawConfig::default()
        };
        let flags = RawConfig {
            listen: Some("127.0.0.1:3".into()),
            ..RawConfig::default()
        };
        let c = resolve(&layers(flags, env, Some(file))).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.policy, Policy::Opportunistic);
        assert_eq!(c.fragment_size, 300);
        assert_eq!(c.max_connections, 256);
        assert_eq!(c.sources["listen"], Source::Flag);
        assert_eq!(c.sources["policy"], Source::Env);
        assert!(matches!(c.sources["fragment_size"], Source::File(_)));
        assert_eq!(c.sources["max_connections"], Source::Default);
        assert!(c.render().contains("listen = \"127.0.0.1:3\"  # --listen"));
    }

    #[test]
    fn unknown_toml_key_is_named() {
        let e = parse_toml("listen = \"127.0.0.1:5222\"\nlisten_addr = 1\n").unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse_toml("max_stanza_bytes = \"big\"\n").unwrap_err();
        assert!(e.contains("max_stanza_bytes"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_source() {
        let flags = RawConfig {
            listen: Some("localhost".into()),
            ..base()
        };
        let e = resolve(&layers(flags, RawConfig::default(), None)).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("listen") && m.contains("--listen"), "{m}");

        let env = RawConfig {
            policy: Some("sometimes".into()),
            ..RawConfig::default()
        };
        let m = resolve(&layers(base(), env, None)).unwrap_err().to_string();
        assert!(m.contains("O2TR_POLICY"), "{m}");
    }

    #[test]
    fn plaintext_needs_loopback_and_tls_needs_pair() {
        let flags = RawConfig {
            listen: Some("0.0.0.0:5222".into()),
            ..base()
        };
        let e = resolve(&layers(flags, RawConfig::default(), None)).unwrap_err();
        assert!(matches!(e, ConfigError::PlaintextNotLoopback { .. }), "{e}");

        let flags = RawConfig {
            tls_cert: Some("/x.pem".into()),
            ..base()
        };
        let e = resolve(&layers(flags, RawConfig::default(), None)).unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");

        let flags = RawConfig {
            allow_plaintext_client: None,
            ..base()
        };
        let e = resolve(&layers(flags, RawConfig::default(), None)).unwrap_err();
        assert!(matches!(e, ConfigError::NoClientTls { .. }), "{e}");
    }

    #[test]
    fn env_layer_parses_types() {
        let vars = |k: &str| match k {
            "O2TR_LISTEN" => Some("127.0.0.1:9".to_owned()),
            "O2TR_DEBUG_PACKETS" => Some("yes".to_owned()),
            "O2TR_FRAGMENT_SIZE" => Some("500".to_owned()),
            "O2TR_POLICY" => Some(String::new()),
            _ => None,
        };
        let raw = raw_from_env(&vars).unwrap();
        assert_eq!(raw.listen.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(raw.debug_packets, Some(true));
        assert_eq!(raw.fragment_size, Some(500));
        assert_eq!(raw.policy, None);
        let bad = |k: &str| (k == "O2TR_MAX_STANZA_BYTES").then(|| "lots".to_owned());
        let e = raw_from_env(&bad).unwrap_err().to_string();
        assert!(e.contains("O2TR_MAX_STANZA_BYTES"), "{e}");
    }

    #[test]
    fn host_port() {
        assert_eq!(
            parse_host_port("xmpp.example.org:5222").unwrap(),
            ("xmpp.example.org".into(), 5222)
        );
        assert_eq!(parse_host_port("[::1]:5222").unwrap(), ("::1".into(), 5222));
        assert!(parse_host_port("example.org").is_err());
        assert!(parse_host_port("example.org:0").is_err());
        assert!(parse_host_port(":5222").is_err());
        assert!(parse_host_port("a:b:5222").is_err());
    }
}
