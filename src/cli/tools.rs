//! Subcommands that need no store: `decode` and `certs`.

use std::io::Read as _;
use std::path::Path;

use o2tr_proxy::certs;
use o2tr_proxy::otr::decode::describe;

use super::{CertsArgs, DecodeArgs, Failure, state_dir};

/// `decode`: describe an OTR wire message (argument, or stdin with `-`).
pub fn decode(a: &DecodeArgs) -> Result<(), Failure> {
    let text = if a.message == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::failed(format!("cannot read stdin: {e}")))?;
        s.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        a.message.clone()
    };
    match describe(&text) {
        Ok(d) => {
            print!("{d}");
            Ok(())
        }
        Err(e) => Err(Failure::failed(format!("malformed OTR message: {e}"))),
    }
}

/// `certs`: make the local CA and the leaf, print how to trust the CA.
pub fn certs(config_flag: Option<&Path>, a: &CertsArgs) -> Result<(), Failure> {
    let dir = match &a.out {
        Some(d) => d.clone(),
        None => state_dir(config_flag, &a.state)?.join(certs::CERTS_DIR),
    };
    let generated =
        certs::generate(&a.domain, time::OffsetDateTime::now_utc()).map_err(|e| match e {
            certs::CertError::BadDomain(_) => Failure::usage(e.to_string()),
            other => Failure::failed(other.to_string()),
        })?;
    let w = certs::write(&dir, &generated, a.force).map_err(|e| Failure::failed(e.to_string()))?;
    let sha: Vec<String> = generated
        .ca_sha256
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    println!(
        "wrote {}  (the CA: trust this one in your client)",
        w.ca.display()
    );
    println!(
        "wrote {}  (certificate for {} and localhost)",
        w.cert.display(),
        a.domain.trim()
    );
    println!("wrote {}  (its private key, mode 0600)", w.key.display());
    println!("CA SHA-256 fingerprint: {}", sha.join(":"));
    println!();
    println!("The CA's private key was not kept: it cannot sign anything else.");
    println!("To trust the CA:");
    println!("  * system-wide (Debian/Ubuntu; most clients use it):");
    println!(
        "      sudo cp {} /usr/local/share/ca-certificates/o2tr-proxy.crt && sudo update-ca-certificates",
        w.ca.display()
    );
    println!("  * or, when the client asks about an unknown certificate on first connect,");
    println!("    accept it after checking the fingerprint above (pin it).");
    if a.out.is_none() {
        println!("`o2tr-proxy run` picks these files up from the state directory by itself.");
    } else {
        println!(
            "Start the proxy with: o2tr-proxy run --tls-cert {} --tls-key {}",
            w.cert.display(),
            w.key.display()
        );
    }
    Ok(())
}
