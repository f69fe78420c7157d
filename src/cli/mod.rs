//! The command line (DESIGN §6 "CLI"): clap definitions and dispatch.
//!
//! Exit codes: 0 success; 1 the command failed (no key, malformed message,
//! I/O error, …); 2 bad usage or configuration (clap's usage errors, an
//! invalid value, an unreadable certificate, an unsafe state directory):
//! nothing was started or changed.

mod run;
mod state;
mod tools;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use o2tr_proxy::config::{self, ConfigError, Layers, RawConfig};

const AFTER_HELP: &str = "\
Every `run` option can also be set in the TOML file (key = option name with
underscores, e.g. max_stanza_bytes) or in an O2TR_* environment variable
(e.g. O2TR_MAX_STANZA_BYTES). Precedence: flags > environment > file >
defaults. `o2tr-proxy run --check-config` prints the result.

Exit codes: 0 ok, 1 the command failed, 2 bad usage or configuration.";

/// A local XMPP proxy that adds OTR v3 and O2TR (offline OTR) end-to-end
/// encryption to any XMPP client.
///
/// Point your client at the proxy (by default 127.0.0.1:5222, STARTTLS with
/// the certificate made by `o2tr-proxy certs`); the proxy connects to your
/// real server and encrypts chat messages end to end.
#[derive(Debug, Parser)]
#[command(name = "o2tr-proxy", version, propagate_version = true, after_help = AFTER_HELP)]
pub struct Cli {
    /// TOML configuration file [env: O2TR_CONFIG]
    /// [default: $XDG_CONFIG_HOME/o2tr-proxy/config.toml, if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the main job; the defaults work as they are).
    Run(Box<RunArgs>),
    /// Generate the long-term OTR (DSA) key of an account and print its
    /// fingerprint.
    Keygen(KeygenArgs),
    /// Print our fingerprints (libotr's form), one per account.
    Fingerprint(FingerprintArgs),
    /// Mark a peer's fingerprint as verified.
    Trust(TrustArgs),
    /// Mark a peer's fingerprint as distrusted.
    Distrust(TrustArgs),
    /// List stored OTR sessions (EKM snapshots); never prints a secret.
    Sessions(StateArg),
    /// Wipe the stored sessions with one peer.
    Forget(ForgetArgs),
    /// Pretty-print an OTR wire message (like libotr's otr_parse).
    Decode(DecodeArgs),
    /// Make a local CA and a certificate for the client leg.
    Certs(CertsArgs),
    /// Import keys, fingerprints and instance tags from libotr's files
    /// (Pidgin, Profanity, irssi-otr, …).
    #[command(name = "import-libotr")]
    ImportLibotr(ImportArgs),
}

/// The state directory option.
#[derive(Debug, Args, Clone, Default)]
pub struct StateArg {
    /// State directory: keys, trust, sessions [env: O2TR_STATE_DIR]
    /// [default: $XDG_DATA_HOME/o2tr-proxy, else ~/.local/share/o2tr-proxy]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Options of `run`. Unset options fall back to the environment, the file
/// and the defaults.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Address to listen on for clients [default: 127.0.0.1:5222]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Connect to this server instead of resolving the account's domain
    /// (SRV, then DOMAIN:5222)
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Advanced: DNS server (IP or IP:PORT) for the upstream's
    /// `_xmpp-client._tcp` SRV lookup [default: the system's resolver]
    #[arg(long, value_name = "ADDR")]
    pub dns_server: Option<String>,
    /// PEM file of CA certificates trusted for the upstream server
    /// [default: the bundled web PKI roots]
    #[arg(long, value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,
    /// DANGEROUS: do not verify the upstream server's certificate
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub upstream_insecure: Option<bool>,
    /// XEP-0198 stream management on the upstream leg, so stanzas lost in
    /// a link cut without a FIN go to offline storage [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub upstream_sm: Option<bool>,
    /// Ping the server after this many silent seconds; 0 never [default: 60]
    #[arg(long, value_name = "SECS")]
    pub upstream_ping_secs: Option<u64>,
    /// Treat the server link as dead when a ping gets no answer within this
    /// many seconds [default: 20]
    #[arg(long, value_name = "SECS")]
    pub upstream_ping_timeout_secs: Option<u64>,
    /// PEM certificate chain offered to clients (with --tls-key)
    /// [default: STATE_DIR/certs/cert.pem if present]
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [default: STATE_DIR/certs/key.pem]
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Accept clients without TLS when no certificate is configured
    /// (loopback listen address only)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub allow_plaintext_client: Option<bool>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// Default OTR policy: manual, opportunistic or always [default: always]
    #[arg(long, value_name = "POLICY")]
    pub policy: Option<String>,
    /// Largest stanza accepted on either leg, in bytes [default: 1048576]
    #[arg(long, value_name = "N")]
    pub max_stanza_bytes: Option<usize>,
    /// Largest number of concurrent client connections [default: 256]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Fragment OTR messages longer than N bytes; 0 never [default: 0]
    #[arg(long, value_name = "N")]
    pub fragment_size: Option<usize>,
    /// OTR heartbeat interval in seconds; 0 off [default: 60]
    #[arg(long, value_name = "SECS")]
    pub heartbeat_secs: Option<u64>,
    /// O2TR: most messages sent without an answer [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_unanswered: Option<u32>,
    /// How long a suspended session is kept, in seconds [default: 604800]
    #[arg(long, value_name = "SECS")]
    pub snapshot_lifetime_secs: Option<u64>,
    /// JID of the control contact [default: control@o2tr.localhost]
    #[arg(long, value_name = "JID")]
    pub control_jid: Option<String>,
    /// Log every stanza in both directions at debug level (bodies, keys
    /// and credentials redacted)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub debug_packets: Option<bool>,
    /// With --debug-packets: do NOT redact message bodies and credentials
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub log_plaintext: Option<bool>,
    /// Log format: human or json [default: human]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Default log filter when RUST_LOG is unset [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Validate the configuration, print the effective settings (with where
    /// each came from) and exit without starting
    #[arg(long, alias = "dry-run")]
    pub check_config: bool,
}

impl RunArgs {
    fn to_raw(&self) -> RawConfig {
        RawConfig {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            upstream_ca: self.upstream_ca.clone(),
            upstream_insecure: self.upstream_insecure,
            dns_server: self.dns_server.clone(),
            upstream_sm: self.upstream_sm,
            upstream_ping_secs: self.upstream_ping_secs,
            upstream_ping_timeout_secs: self.upstream_ping_timeout_secs,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            allow_plaintext_client: self.allow_plaintext_client,
            state_dir: self.state.state_dir.clone(),
            policy: self.policy.clone(),
            max_stanza_bytes: self.max_stanza_bytes,
            max_connections: self.max_connections,
            fragment_size: self.fragment_size,
            heartbeat_secs: self.heartbeat_secs,
            max_unanswered: self.max_unanswered,
            snapshot_lifetime_secs: self.snapshot_lifetime_secs,
            control_jid: self.control_jid.clone(),
            debug_packets: self.debug_packets,
            log_plaintext: self.log_plaintext,
            log_format: self.log_format.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

/// Options of `keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// The account (your JID; a resource is dropped)
    #[arg(long, value_name = "JID")]
    pub account: String,
    /// Replace an existing key (your contacts will see a new fingerprint)
    #[arg(long)]
    pub force: bool,
}

/// Options of `fingerprint`.
#[derive(Debug, Args)]
pub struct FingerprintArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// Only this account (prints the fingerprint alone)
    #[arg(long, value_name = "JID")]
    pub account: Option<String>,
    /// List the peers' fingerprints we know, with their trust, instead
    #[arg(long)]
    pub peers: bool,
}

/// Options of `trust` and `distrust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// Your account
    #[arg(long, value_name = "JID")]
    pub account: String,
    /// The peer
    #[arg(long, value_name = "JID")]
    pub peer: String,
    /// The peer's fingerprint: 40 hex digits, spaces allowed
    #[arg(long, value_name = "HEX")]
    pub fingerprint: String,
}

/// Options of `forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// Your account
    #[arg(long, value_name = "JID")]
    pub account: String,
    /// The peer whose sessions are wiped
    #[arg(long, value_name = "JID")]
    pub peer: String,
}

/// Options of `decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The message (e.g. '?OTR:AAMD...'), or - to read it from stdin
    #[arg(value_name = "MESSAGE", allow_hyphen_values = true)]
    pub message: String,
}

/// Options of `certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// Your XMPP domain (the part after @ in your JID)
    #[arg(long, value_name = "DOMAIN")]
    pub domain: String,
    /// Where to write ca.pem, cert.pem, key.pem [default: STATE_DIR/certs]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
}

/// Options of `import-libotr`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub state: StateArg,
    /// libotr's otr.private_key (e.g. ~/.purple/otr.private_key)
    #[arg(long, value_name = "FILE")]
    pub private_key: PathBuf,
    /// libotr's otr.fingerprints [default: next to the key, if present]
    #[arg(long, value_name = "FILE")]
    pub fingerprints: Option<PathBuf>,
    /// libotr's otr.instance_tags [default: next to the key, if present]
    #[arg(long, value_name = "FILE")]
    pub instance_tags: Option<PathBuf>,
    /// Import only this account
    #[arg(long, value_name = "JID")]
    pub account: Option<String>,
    /// Replace keys already in the store
    #[arg(long)]
    pub force: bool,
}

/// A failed command: the line to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// 1 (failed) or 2 (usage/configuration).
    pub code: u8,
    /// One line.
    pub message: String,
}

impl Failure {
    /// Bad usage or configuration (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    /// The command failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e.to_string())
    }
}

impl From<o2tr_proxy::store::Error> for Failure {
    fn from(e: o2tr_proxy::store::Error) -> Self {
        use o2tr_proxy::store::Error as E;
        match e {
            E::UnsafePermissions { .. } | E::NewerSchema { .. } | E::NotADatabase { .. } => {
                Failure::usage(format!("state directory: {e}"))
            }
            other => Failure::failed(format!("store: {other}")),
        }
    }
}

/// The environment, as the config module wants it.
pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The three layers for `flags`: `O2TR_*` variables and the TOML file.
pub(crate) fn layers(config_flag: Option<&Path>, flags: RawConfig) -> Result<Layers, Failure> {
    let env = config::raw_from_env(&env_var)?;
    let file = match config::config_file_path(config_flag, &env_var) {
        Some(p) => {
            let raw = config::load_file(&p)?;
            Some((p, raw))
        }
        None => None,
    };
    Ok(Layers { flags, env, file })
}

/// The state directory for the subcommands other than `run`.
pub(crate) fn state_dir(config_flag: Option<&Path>, arg: &StateArg) -> Result<PathBuf, Failure> {
    let flags = RawConfig {
        state_dir: arg.state_dir.clone(),
        ..RawConfig::default()
    };
    Ok(layers(config_flag, flags)?.state_dir()?.0)
}

/// Parses argv, runs the command, prints a failure as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = cli.config.as_deref();
    let result = match cli.command {
        Command::Run(a) => run::run(cfg, &a),
        Command::Keygen(a) => state::keygen(cfg, &a),
        Command::Fingerprint(a) => state::fingerprint(cfg, &a),
        Command::Trust(a) => state::trust(cfg, &a, true),
        Command::Distrust(a) => state::trust(cfg, &a, false),
        Command::Sessions(a) => state::sessions(cfg, &a),
        Command::Forget(a) => state::forget(cfg, &a),
        Command::Decode(a) => tools::decode(&a),
        Command::Certs(a) => tools::certs(cfg, &a),
        Command::ImportLibotr(a) => state::import_libotr(cfg, &a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("o2tr-proxy: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_cover_every_key() {
        let help = Cli::command()
            .find_subcommand_mut("run")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        for key in config::KEYS {
            assert!(help.contains(&config::flag_name(key)), "{key}");
        }
    }
}
