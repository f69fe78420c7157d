//! The local certificate authority for the client leg (DESIGN §6,
//! `o2tr-proxy certs`).
//!
//! The client talks STARTTLS to the proxy, so the proxy needs a certificate
//! the client accepts for the user's XMPP domain. rustls (and most clients)
//! refuse a self-signed CA certificate used directly as a server
//! certificate, so we make two: a local CA (`CA:TRUE`, `keyCertSign`) that
//! the user trusts in the client once, and a leaf for the domain (SANs: the
//! domain, `localhost`, `127.0.0.1`, `::1`; `serverAuth`) signed by it.
//!
//! The CA private key is never written: once the leaf is signed it is
//! dropped, so trusting the CA cannot later be abused to sign certificates
//! for other names. Running `certs` again makes a new CA.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use zeroize::Zeroizing;

/// Sub-directory of the state directory holding the files.
pub const CERTS_DIR: &str = "certs";
/// The CA certificate (to trust in the client).
pub const CA_FILE: &str = "ca.pem";
/// The leaf certificate (served to clients).
pub const CERT_FILE: &str = "cert.pem";
/// The leaf's private key (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// Validity of the CA certificate, in days.
pub const CA_DAYS: i64 = 3650;
/// Validity of the leaf certificate, in days (825: the longest some client
/// platforms accept for a server certificate).
pub const LEAF_DAYS: i64 = 825;

/// Errors of certificate generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The domain is not a usable DNS name.
    #[error("invalid domain {0:?}: expected a DNS name like example.org")]
    BadDomain(String),
    /// rcgen failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists and `force` was not given.
    #[error("{0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A generated CA and leaf, in PEM.
pub struct Generated {
    /// CA certificate.
    pub ca_pem: String,
    /// Leaf certificate.
    pub cert_pem: String,
    /// Leaf private key (PKCS#8).
    pub key_pem: Zeroizing<String>,
    /// SHA-256 of the CA certificate (DER), to compare when trusting it.
    pub ca_sha256: [u8; 32],
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generated")
            .field("ca_sha256", &self.ca_sha256)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Where the files were written.
#[derive(Clone, Debug)]
pub struct Written {
    /// CA certificate path.
    pub ca: PathBuf,
    /// Leaf certificate path.
    pub cert: PathBuf,
    /// Leaf key path.
    pub key: PathBuf,
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Makes a CA and a leaf for `domain`, valid from a day before `now`.
pub fn generate(domain: &str, now: time::OffsetDateTime) -> Result<Generated, CertError> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if !valid_domain(&domain) {
        return Err(CertError::BadDomain(domain));
    }
    let day = time::Duration::days(1);
    let days = |n: i64| time::Duration::days(n);
    let start = now - day;

    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("o2tr-proxy local CA for {domain}"),
    );
    ca.distinguished_name
        .push(DnType::OrganizationName, "o2tr-proxy (local)");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = start;
    ca.not_after = now + days(CA_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, domain.clone());
    leaf.subject_alt_names = vec![
        SanType::DnsName(domain.clone().try_into()?),
        SanType::DnsName("localhost".to_owned().try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = start;
    leaf.not_after = now + days(LEAF_DAYS);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    let digest = <sha2::Sha256 as sha2::Digest>::digest(ca_cert.der().as_ref());
    let mut ca_sha256 = [0u8; 32];
    ca_sha256.copy_from_slice(&digest);
    Ok(Generated {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: Zeroizing::new(leaf_key.serialize_pem()),
        ca_sha256,
    })
}

/// The leaf certificate and key in `dir`, if both exist.
pub fn find(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let cert = dir.join(CERT_FILE);
    let key = dir.join(KEY_FILE);
    (cert.is_file() && key.is_file()).then_some((cert, key))
}

/// Writes the files into `dir` (created 0700 if missing). The key is
/// written 0600. Refuses to replace existing files unless `force`.
pub fn write(dir: &Path, g: &Generated, force: bool) -> Result<Written, CertError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io { path, source }
    };
    let out = Written {
        ca: dir.join(CA_FILE),
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
    };
    if !force {
        for p in [&out.ca, &out.cert, &out.key] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    create_private_dir(dir).map_err(io(dir))?;
    write_file(&out.ca, g.ca_pem.as_bytes(), 0o644).map_err(io(&out.ca))?;
    write_file(&out.cert, g.cert_pem.as_bytes(), 0o644).map_err(io(&out.cert))?;
    write_file(&out.key, g.key_pem.as_bytes(), 0o600).map_err(io(&out.key))?;
    Ok(out)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Writes through a temporary file created with `mode`, then renames it into
/// place, so a reader never sees a half-written file or a key with wider
/// permissions.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_domains() {
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        for d in ["", "a b", "-x.org", "x..org", "user@x.org"] {
            assert!(
                matches!(generate(d, now), Err(CertError::BadDomain(_))),
                "{d}"
            );
        }
    }

    #[test]
    fn writes_files_with_modes() {
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let g = generate("Example.TEST.", now).unwrap();
        assert!(g.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("certs");
        let w = write(&sub, &g, false).unwrap();
        assert_eq!(find(&sub), Some((w.cert.clone(), w.key.clone())));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&w.key), 0o600);
            assert_eq!(mode(&sub), 0o700);
        }
        assert!(matches!(write(&sub, &g, false), Err(CertError::Exists(_))));
        write(&sub, &g, true).unwrap();
    }
}
