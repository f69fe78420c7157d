//! The subcommands that read or change the store: `keygen`, `fingerprint`,
//! `trust`, `distrust`, `sessions`, `forget`, `import-libotr`. None of them
//! prints a secret.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use o2tr_proxy::libotr_import::{self, LibotrKey};
use o2tr_proxy::otr::crypto::{DsaPrivateKey, Fingerprint};
use o2tr_proxy::otr::offline::SnapshotInfo;
use o2tr_proxy::store::{DurableOp, SessionState, SqliteStore, Store, Trust};

use super::{
    Failure, FingerprintArgs, ForgetArgs, ImportArgs, KeygenArgs, StateArg, TrustArgs, state_dir,
};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A bare, lowercased JID from the user, or a usage error naming `what`.
fn jid_arg(what: &str, s: &str) -> Result<String, Failure> {
    libotr_import::bare_jid(s).ok_or_else(|| {
        Failure::usage(format!(
            "invalid {what} {s:?}: expected a JID like alice@example.org"
        ))
    })
}

/// Opens (creating) the store.
fn open(config_flag: Option<&Path>, arg: &StateArg) -> Result<SqliteStore, Failure> {
    let dir = state_dir(config_flag, arg)?;
    Ok(SqliteStore::open(&dir)?)
}

/// Opens the store for reading; a missing state directory is an error
/// rather than created.
fn open_existing(config_flag: Option<&Path>, arg: &StateArg) -> Result<SqliteStore, Failure> {
    let dir = state_dir(config_flag, arg)?;
    o2tr_proxy::config::check_state_dir(&dir).map_err(|m| {
        Failure::usage(format!(
            "state directory: refusing to use {}: {m}",
            dir.display()
        ))
    })?;
    if !dir.join(o2tr_proxy::store::DB_FILE_NAME).exists() {
        return Err(Failure::failed(format!(
            "no store in {} (create a key with `o2tr-proxy keygen --account JID`, or pass --state-dir)",
            dir.display()
        )));
    }
    Ok(SqliteStore::open(&dir)?)
}

fn our_fingerprint(store: &dyn Store, account: &str) -> Result<Option<Fingerprint>, Failure> {
    match store.account_key(account)? {
        None => Ok(None),
        Some(bytes) => DsaPrivateKey::from_bytes(&bytes)
            .map(|k| Some(k.public_key().fingerprint()))
            .map_err(|e| Failure::failed(format!("stored key of {account} is unreadable: {e}"))),
    }
}

fn random_instance_tag() -> u32 {
    use rand::Rng as _;
    let mut rng = rand::rng();
    loop {
        let t = rng.next_u32();
        if t >= 0x100 {
            return t;
        }
    }
}

/// `keygen`.
pub fn keygen(config_flag: Option<&Path>, a: &KeygenArgs) -> Result<(), Failure> {
    let account = jid_arg("account", &a.account)?;
    let mut store = open(config_flag, &a.state)?;
    if let Some(old) = our_fingerprint(&store, &account)? {
        if !a.force {
            return Err(Failure::failed(format!(
                "{account} already has a key ({old}); use --force to replace it \
                 (your contacts will then see a new, unverified fingerprint)"
            )));
        }
    }
    eprintln!("generating a DSA key for {account} ...");
    let key = DsaPrivateKey::generate(&mut rand::rng());
    store.set_account_key(&account, &key.to_bytes())?;
    if store.instance_tag(&account)?.is_none() {
        store.set_instance_tag(&account, random_instance_tag())?;
    }
    println!("{account}\t{}", key.public_key().fingerprint());
    Ok(())
}

fn trust_name(t: Trust) -> &'static str {
    match t {
        Trust::Unverified => "unverified",
        Trust::Verified => "verified",
        Trust::Distrusted => "distrusted",
    }
}

/// `fingerprint`.
pub fn fingerprint(config_flag: Option<&Path>, a: &FingerprintArgs) -> Result<(), Failure> {
    let store = open_existing(config_flag, &a.state)?;
    let only = a
        .account
        .as_deref()
        .map(|s| jid_arg("account", s))
        .transpose()?;
    if a.peers {
        let mut any = false;
        for r in store.all_fingerprints()? {
            if only.as_ref().is_some_and(|o| *o != r.account) {
                continue;
            }
            any = true;
            println!(
                "{}\t{}\t{}\t{}",
                r.account,
                r.peer,
                Fingerprint(r.fingerprint),
                trust_name(r.trust)
            );
        }
        if !any {
            eprintln!("no peer fingerprints known");
        }
        return Ok(());
    }
    if let Some(account) = only {
        return match our_fingerprint(&store, &account)? {
            Some(f) => {
                println!("{f}");
                Ok(())
            }
            None => Err(Failure::failed(format!(
                "no key for {account} (create one with `o2tr-proxy keygen --account {account}`)"
            ))),
        };
    }
    let mut any = false;
    for account in store.accounts()? {
        if let Some(f) = our_fingerprint(&store, &account)? {
            any = true;
            println!("{account}\t{f}");
        }
    }
    if any {
        Ok(())
    } else {
        Err(Failure::failed(
            "no keys yet (create one with `o2tr-proxy keygen --account JID`)",
        ))
    }
}

/// `trust` (`verified = true`) and `distrust`.
pub fn trust(config_flag: Option<&Path>, a: &TrustArgs, verified: bool) -> Result<(), Failure> {
    let account = jid_arg("account", &a.account)?;
    let peer = jid_arg("peer", &a.peer)?;
    let fpr = Fingerprint::from_hex(&a.fingerprint).ok_or_else(|| {
        Failure::usage(format!(
            "invalid fingerprint {:?}: expected 40 hex digits (spaces allowed)",
            a.fingerprint
        ))
    })?;
    let mut store = open(config_flag, &a.state)?;
    let known = store
        .fingerprints(&account, &peer)?
        .iter()
        .any(|r| r.fingerprint == fpr.0);
    let t = if verified {
        Trust::Verified
    } else {
        Trust::Distrusted
    };
    store.set_fingerprint(&account, &peer, &fpr.0, t, now())?;
    println!(
        "{peer} {fpr}: {} (for {account}){}",
        trust_name(t),
        if known { "" } else { "; not seen yet" }
    );
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn state_name(s: SessionState) -> &'static str {
    match s {
        SessionState::Live => "live",
        SessionState::Suspended => "suspended",
        SessionState::Finished => "finished",
    }
}

/// `sessions`: one row per stored snapshot.
pub fn sessions(config_flag: Option<&Path>, a: &StateArg) -> Result<(), Failure> {
    let store = open_existing(config_flag, a)?;
    let now = now();
    let mut rows = vec![
        [
            "ACCOUNT",
            "PEER",
            "INSTANCE",
            "STATE",
            "VERSION",
            "OUR-KEYID",
            "THEIR-KEYID",
            "AGE",
            "FINGERPRINT",
            "TRUST",
        ]
        .map(String::from),
    ];
    let mut trust_cache: BTreeMap<(String, String), Vec<(Fingerprint, Trust)>> = BTreeMap::new();
    for s in store.snapshots()? {
        let key = (s.key.account.clone(), s.key.peer.clone());
        if !trust_cache.contains_key(&key) {
            let list = store
                .fingerprints(&key.0, &key.1)?
                .into_iter()
                .map(|r| (Fingerprint(r.fingerprint), r.trust))
                .collect();
            trust_cache.insert(key.clone(), list);
        }
        let info = SnapshotInfo::of(&s.data).ok();
        let (version, ours, theirs, fpr, trust, last) = match &info {
            Some(i) => {
                let t = trust_cache
                    .get(&key)
                    .and_then(|l| l.iter().find(|(f, _)| *f == i.fingerprint))
                    .map_or("unknown", |(_, t)| trust_name(*t));
                (
                    format!("{:?}", i.version).to_lowercase(),
                    i.our_keyid.to_string(),
                    i.their_keyid.to_string(),
                    i.fingerprint.to_string(),
                    t.to_owned(),
                    i.last_activity.max(s.updated_at),
                )
            }
            None => {
                let q = || "?".to_owned();
                (
                    q(),
                    q(),
                    q(),
                    "(unreadable snapshot)".into(),
                    q(),
                    s.updated_at,
                )
            }
        };
        rows.push([
            s.key.account.clone(),
            s.key.peer.clone(),
            format!("{:08x}", s.key.instance),
            state_name(s.state).to_owned(),
            version,
            ours,
            theirs,
            age(now.saturating_sub(last)),
            fpr,
            trust,
        ]);
    }
    if rows.len() == 1 {
        println!("no sessions");
        return Ok(());
    }
    let mut widths = [0usize; 10];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(())
}

/// `forget`: wipe every snapshot of one peer, and the records of our
/// handshakes with it that wait for a Signature.
pub fn forget(config_flag: Option<&Path>, a: &ForgetArgs) -> Result<(), Failure> {
    let account = jid_arg("account", &a.account)?;
    let peer = jid_arg("peer", &a.peer)?;
    let mut store = open_existing(config_flag, &a.state)?;
    let mut n = 0;
    for s in store.snapshots_for_peer(&account, &peer)? {
        if store.delete_snapshot(&s.key)? {
            n += 1;
        }
    }
    let handshakes: Vec<DurableOp> = store
        .handshakes(&account, &peer)?
        .into_iter()
        .map(|r| DurableOp::DeleteHandshake {
            instance: r.instance,
        })
        .collect();
    if !handshakes.is_empty() {
        store.commit_step(&account, &peer, &handshakes, now())?;
        store.maintenance()?;
    }
    match (n, handshakes.len()) {
        (0, 0) => println!("no sessions with {peer} for {account}"),
        (n, 0) => println!("wiped {n} session(s) with {peer} for {account}"),
        (n, h) => println!(
            "wiped {n} session(s) and {h} unfinished handshake(s) with {peer} for {account}"
        ),
    }
    Ok(())
}

fn read_file(path: &Path, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| Failure::usage(format!("cannot read {what} {}: {e}", path.display())))
}

/// The file given, else `name` next to the key if it exists.
fn sibling(given: Option<&PathBuf>, key: &Path, name: &str) -> Option<PathBuf> {
    given.cloned().or_else(|| {
        let p = key.parent().unwrap_or(Path::new(".")).join(name);
        p.is_file().then_some(p)
    })
}

/// `import-libotr`.
pub fn import_libotr(config_flag: Option<&Path>, a: &ImportArgs) -> Result<(), Failure> {
    let only = a
        .account
        .as_deref()
        .map(|s| jid_arg("account", s))
        .transpose()?;
    let key_text = read_file(&a.private_key, "private key file")?;
    let keys = libotr_import::parse_private_keys(&key_text)
        .map_err(|e| Failure::failed(format!("{}: {e}", a.private_key.display())))?;

    // Select the XMPP accounts to import; keep libotr's first key per bare JID.
    let mut selected: BTreeMap<String, &LibotrKey> = BTreeMap::new();
    for k in &keys {
        if !libotr_import::is_xmpp_protocol(&k.protocol) {
            eprintln!(
                "skipping {} (protocol {} is not XMPP)",
                k.account, k.protocol
            );
            continue;
        }
        let Some(bare) = libotr_import::bare_jid(&k.account) else {
            eprintln!("skipping {:?} (not a JID)", k.account);
            continue;
        };
        if only.as_ref().is_some_and(|o| *o != bare) {
            continue;
        }
        if selected.contains_key(&bare) {
            eprintln!(
                "skipping a second key for {bare} ({}); the first one is imported",
                k.account
            );
            continue;
        }
        selected.insert(bare, k);
    }
    if selected.is_empty() {
        return Err(Failure::failed(match &only {
            Some(o) => format!("no XMPP key for {o} in {}", a.private_key.display()),
            None => format!("no XMPP key in {}", a.private_key.display()),
        }));
    }

    let fpr_path = sibling(a.fingerprints.as_ref(), &a.private_key, "otr.fingerprints");
    let fingerprints = match &fpr_path {
        Some(p) => {
            let text = read_file(p, "fingerprints file")?;
            let text = String::from_utf8_lossy(&text).into_owned();
            libotr_import::parse_fingerprints(&text)
                .map_err(|e| Failure::failed(format!("{}: {e}", p.display())))?
        }
        None => Vec::new(),
    };
    let tag_path = sibling(
        a.instance_tags.as_ref(),
        &a.private_key,
        "otr.instance_tags",
    );
    let tags = match &tag_path {
        Some(p) => {
            let text = read_file(p, "instance tags file")?;
            let text = String::from_utf8_lossy(&text).into_owned();
            libotr_import::parse_instance_tags(&text)
                .map_err(|e| Failure::failed(format!("{}: {e}", p.display())))?
        }
        None => Vec::new(),
    };

    let mut store = open(config_flag, &a.state)?;
    // Check every account before changing anything.
    for (bare, k) in &selected {
        if let Some(old) = our_fingerprint(&store, bare)? {
            let new = k.key.public_key().fingerprint();
            if old != new && !a.force {
                return Err(Failure::failed(format!(
                    "{bare} already has a different key ({old}); use --force to replace it"
                )));
            }
        }
    }
    let now = now();
    for (bare, k) in &selected {
        store.set_account_key(bare, &k.key.to_bytes())?;
        println!("{bare}\t{}", k.key.public_key().fingerprint());
        let tag = tags.iter().find(|t| {
            libotr_import::is_xmpp_protocol(&t.protocol)
                && libotr_import::bare_jid(&t.account).as_ref() == Some(bare)
        });
        if let Some(t) = tag {
            store.set_instance_tag(bare, t.tag)?;
            eprintln!("  instance tag {:08x}", t.tag);
        } else if store.instance_tag(bare)?.is_none() {
            store.set_instance_tag(bare, random_instance_tag())?;
        }
    }
    let accounts: BTreeSet<&String> = selected.keys().collect();
    let (mut imported, mut skipped) = (0usize, 0usize);
    for f in &fingerprints {
        let (Some(acc), Some(peer)) = (
            libotr_import::bare_jid(&f.account),
            libotr_import::bare_jid(&f.peer),
        ) else {
            skipped += 1;
            continue;
        };
        if !libotr_import::is_xmpp_protocol(&f.protocol) || !accounts.contains(&acc) {
            skipped += 1;
            continue;
        }
        let existing = store
            .fingerprints(&acc, &peer)?
            .into_iter()
            .find(|r| r.fingerprint == f.fingerprint.0);
        let trust = if f.is_verified() {
            Trust::Verified
        } else {
            Trust::Unverified
        };
        // Never downgrade a trust decision already made here.
        if existing.is_some() && trust == Trust::Unverified {
            continue;
        }
        store.set_fingerprint(&acc, &peer, &f.fingerprint.0, trust, now)?;
        imported += 1;
    }
    if !fingerprints.is_empty() || fpr_path.is_some() {
        eprintln!(
            "imported {imported} peer fingerprint(s){}",
            if skipped > 0 {
                format!(", skipped {skipped} of other accounts or protocols")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
