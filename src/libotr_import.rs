//! Reading libotr's files, for `o2tr-proxy import-libotr` (DESIGN §6), so a
//! user keeps the fingerprint their contacts already verified.
//!
//! * `otr.private_key`: a libgcrypt S-expression written by
//!   `otrl_privkey_generate`:
//!   `(privkeys (account (name "alice@example.org") (protocol prpl-jabber)
//!   (private-key (dsa (p #00FC…#) (q #…#) (g #…#) (y #…#) (x #…#)))) …)`.
//!   [`parse_sexp`] reads libgcrypt's advanced and canonical forms: tokens,
//!   `"quoted strings"` with C escapes, `#hex#`, `|base64|` and
//!   length-prefixed `N:bytes`.
//! * `otr.fingerprints`: one line per peer fingerprint,
//!   `username \t accountname \t protocol \t fingerprint-hex \t trust`
//!   (`username` is the peer; any non-empty trust, e.g. `verified` or
//!   `smp`, means libotr trusts it).
//! * `otr.instance_tags`: `accountname \t protocol \t instag-hex` per line.
//!
//! Account names may carry a resource (`alice@example.org/Home`); [`bare_jid`]
//! reduces them to the bare JID the store uses.

use zeroize::Zeroizing;

use crate::otr::crypto::{CryptoError, DsaPrivateKey, Fingerprint};
use crate::xmpp::jid::Jid;

/// Deepest nesting accepted in an S-expression (libotr's files use 5).
const MAX_DEPTH: usize = 32;

/// Errors reading libotr files. Positions are 1-based.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The S-expression is malformed.
    #[error("malformed S-expression at byte {offset}: {message}")]
    Sexp {
        /// Byte offset.
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// The S-expression is well formed but not libotr's key file layout.
    #[error("not a libotr private key file: {0}")]
    Layout(String),
    /// An account's DSA key is invalid.
    #[error("account {account:?}: invalid DSA key: {source}")]
    Key {
        /// The account.
        account: String,
        /// The cause.
        #[source]
        source: CryptoError,
    },
    /// A line of a tab-separated file is malformed.
    #[error("line {line}: {message}")]
    Line {
        /// Line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// An S-expression. Atoms are zeroized on drop (key files hold secrets).
#[derive(Clone, PartialEq, Eq)]
pub enum Sexp {
    /// A token, string or byte string.
    Atom(Zeroizing<Vec<u8>>),
    /// A parenthesized list.
    List(Vec<Sexp>),
}

impl std::fmt::Debug for Sexp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sexp::Atom(a) => write!(f, "<{} bytes>", a.len()),
            Sexp::List(l) => f.debug_list().entries(l).finish(),
        }
    }
}

impl Sexp {
    fn atom(&self) -> Option<&[u8]> {
        match self {
            Sexp::Atom(a) => Some(a),
            Sexp::List(_) => None,
        }
    }

    /// For a list whose first element is the token `name`, the rest.
    fn tagged(&self, name: &str) -> Option<&[Sexp]> {
        match self {
            Sexp::List(l) => match l.split_first() {
                Some((Sexp::Atom(head), rest)) if head.as_slice() == name.as_bytes() => Some(rest),
                _ => None,
            },
            Sexp::Atom(_) => None,
        }
    }

    /// In a list's elements, the first sub-list tagged `name`.
    fn child<'a>(items: &'a [Sexp], name: &str) -> Option<&'a [Sexp]> {
        items.iter().find_map(|s| s.tagged(name))
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T, ImportError> {
        Err(ImportError::Sexp {
            offset: self.i + 1,
            message: message.into(),
        })
    }

    fn skip_ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn value(&mut self, depth: usize) -> Result<Sexp, ImportError> {
        self.skip_ws();
        match self.peek() {
            None => self.err("unexpected end of input"),
            Some(b'(') => {
                if depth >= MAX_DEPTH {
                    return self.err("nested too deeply");
                }
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    match self.peek() {
                        None => return self.err("unclosed '('"),
                        Some(b')') => {
                            self.i += 1;
                            return Ok(Sexp::List(items));
                        }
                        Some(_) => items.push(self.value(depth + 1)?),
                    }
                }
            }
            Some(b')') => self.err("unexpected ')'"),
            Some(b'"') => self.quoted(),
            Some(b'#') => self.hex(),
            Some(b'|') => self.base64(),
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                match self.peek() {
                    Some(b':') => {
                        let len: usize = std::str::from_utf8(&self.b[start..self.i])
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or(())
                            .or_else(|()| self.err("bad length prefix"))?;
                        self.i += 1;
                        let end = self.i.checked_add(len).filter(|e| *e <= self.b.len());
                        let Some(end) = end else {
                            return self.err("length prefix beyond end of input");
                        };
                        let v = self.b[self.i..end].to_vec();
                        self.i = end;
                        Ok(Sexp::Atom(Zeroizing::new(v)))
                    }
                    // A display hint length before a string: ignore it.
                    Some(b'"') => self.quoted(),
                    Some(b'#') => self.hex(),
                    Some(b'|') => self.base64(),
                    _ => {
                        self.i = start;
                        self.token()
                    }
                }
            }
            Some(_) => self.token(),
        }
    }

    fn token(&mut self) -> Result<Sexp, ImportError> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| !c.is_ascii_whitespace() && !b"()\"#|".contains(&c))
        {
            self.i += 1;
        }
        if self.i == start {
            return self.err("unexpected character");
        }
        Ok(Sexp::Atom(Zeroizing::new(self.b[start..self.i].to_vec())))
    }

    fn quoted(&mut self) -> Result<Sexp, ImportError> {
        self.i += 1; // opening quote
        let mut out = Zeroizing::new(Vec::new());
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => return Ok(Sexp::Atom(out)),
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    match e {
                        b'b' => out.push(8),
                        b't' => out.push(b'\t'),
                        b'v' => out.push(11),
                        b'n' => out.push(b'\n'),
                        b'f' => out.push(12),
                        b'r' => out.push(b'\r'),
                        b'"' | b'\'' | b'\\' => out.push(e),
                        b'\n' => {
                            if self.peek() == Some(b'\r') {
                                self.i += 1;
                            }
                        }
                        b'\r' => {
                            if self.peek() == Some(b'\n') {
                                self.i += 1;
                            }
                        }
                        b'x' => {
                            let h = self.b.get(self.i..self.i + 2).and_then(|h| {
                                u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
                            });
                            let Some(v) = h else {
                                return self.err("bad \\x escape");
                            };
                            self.i += 2;
                            out.push(v);
                        }
                        b'0'..=b'7' => {
                            let o = self.b.get(self.i - 1..self.i + 2).and_then(|o| {
                                u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok()
                            });
                            let Some(v) = o else {
                                return self.err("bad octal escape");
                            };
                            self.i += 2;
                            out.push(v);
                        }
                        _ => return self.err("unknown escape"),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn hex(&mut self) -> Result<Sexp, ImportError> {
        self.i += 1;
        let mut digits = Zeroizing::new(Vec::new());
        loop {
            match self.peek() {
                None => return self.err("unterminated #hex#"),
                Some(b'#') => {
                    self.i += 1;
                    break;
                }
                Some(c) if c.is_ascii_whitespace() => self.i += 1,
                Some(c) => match (c as char).to_digit(16) {
                    Some(d) => {
                        digits.push(d as u8);
                        self.i += 1;
                    }
                    None => return self.err("bad hex digit"),
                },
            }
        }
        if digits.len() % 2 != 0 {
            return self.err("odd number of hex digits");
        }
        let out: Vec<u8> = digits.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
        Ok(Sexp::Atom(Zeroizing::new(out)))
    }

    fn base64(&mut self) -> Result<Sexp, ImportError> {
        use base64::Engine as _;
        self.i += 1;
        let start = self.i;
        while self.peek().is_some_and(|c| c != b'|') {
            self.i += 1;
        }
        if self.peek().is_none() {
            return self.err("unterminated |base64|");
        }
        let text: Zeroizing<Vec<u8>> = Zeroizing::new(
            self.b[start..self.i]
                .iter()
                .copied()
                .filter(|c| !c.is_ascii_whitespace())
                .collect(),
        );
        self.i += 1;
        match base64::engine::general_purpose::STANDARD.decode(&*text) {
            Ok(v) => Ok(Sexp::Atom(Zeroizing::new(v))),
            Err(_) => self.err("bad base64"),
        }
    }
}

/// Parses every top-level S-expression in `text`.
pub fn parse_sexp(text: &[u8]) -> Result<Vec<Sexp>, ImportError> {
    let mut p = Parser { b: text, i: 0 };
    let mut out = Vec::new();
    loop {
        p.skip_ws();
        if p.peek().is_none() {
            return Ok(out);
        }
        out.push(p.value(0)?);
    }
}

/// One account's key from `otr.private_key`.
pub struct LibotrKey {
    /// The account name as libotr stored it (may carry a resource).
    pub account: String,
    /// libotr's protocol name (`prpl-jabber`, `xmpp`, …).
    pub protocol: String,
    /// The key.
    pub key: DsaPrivateKey,
}

impl std::fmt::Debug for LibotrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibotrKey")
            .field("account", &self.account)
            .field("protocol", &self.protocol)
            .field("fingerprint", &self.key.public_key().fingerprint().to_hex())
            .finish()
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, ImportError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ImportError::Layout(format!("{what} is not UTF-8")))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

/// Reads libotr's `otr.private_key`.
pub fn parse_private_keys(text: &[u8]) -> Result<Vec<LibotrKey>, ImportError> {
    let top = parse_sexp(text)?;
    let [root] = top.as_slice() else {
        return Err(ImportError::Layout(format!(
            "expected one (privkeys ...) expression, found {}",
            top.len()
        )));
    };
    let accounts = root
        .tagged("privkeys")
        .ok_or_else(|| ImportError::Layout("the file does not start with (privkeys".into()))?;
    let mut out = Vec::new();
    for acc in accounts {
        let items = acc.tagged("account").ok_or_else(|| {
            ImportError::Layout("an entry of privkeys is not (account ...)".into())
        })?;
        let field = |name: &str| -> Result<String, ImportError> {
            let v = Sexp::child(items, name)
                .and_then(|r| r.first())
                .and_then(Sexp::atom)
                .ok_or_else(|| ImportError::Layout(format!("an account has no ({name} ...)")))?;
            utf8(v, name)
        };
        let account = field("name")?;
        let protocol = field("protocol")?;
        let dsa = Sexp::child(items, "private-key")
            .and_then(|pk| Sexp::child(pk, "dsa"))
            .ok_or_else(|| {
                ImportError::Layout(format!(
                    "account {account:?} has no (private-key (dsa ...))"
                ))
            })?;
        let part = |name: &str| -> Result<&[u8], ImportError> {
            Sexp::child(dsa, name)
                .and_then(|r| r.first())
                .and_then(Sexp::atom)
                .map(strip_zeros)
                .ok_or_else(|| {
                    ImportError::Layout(format!("account {account:?}: DSA key has no {name}"))
                })
        };
        let key = DsaPrivateKey::from_components(
            part("p")?,
            part("q")?,
            part("g")?,
            part("y")?,
            part("x")?,
        )
        .map_err(|source| ImportError::Key {
            account: account.clone(),
            source,
        })?;
        out.push(LibotrKey {
            account,
            protocol,
            key,
        });
    }
    Ok(out)
}

/// One line of `otr.fingerprints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibotrFingerprint {
    /// The peer (libotr's `username`).
    pub peer: String,
    /// Our account.
    pub account: String,
    /// Protocol name.
    pub protocol: String,
    /// The peer's fingerprint.
    pub fingerprint: Fingerprint,
    /// libotr's trust string (`""` = not verified).
    pub trust: String,
}

impl LibotrFingerprint {
    /// libotr treats any non-empty trust string as verified.
    pub fn is_verified(&self) -> bool {
        !self.trust.is_empty()
    }
}

fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(n, l)| {
        let l = l.trim_end_matches('\r');
        // libotr writes a `# WARNING! ...` comment line into otr.instance_tags.
        (!l.trim().is_empty() && !l.starts_with('#')).then(|| (n + 1, l.split('\t').collect()))
    })
}

/// Reads libotr's `otr.fingerprints`.
pub fn parse_fingerprints(text: &str) -> Result<Vec<LibotrFingerprint>, ImportError> {
    let mut out = Vec::new();
    for (line, f) in lines(text) {
        if f.len() < 4 || f.len() > 5 {
            return Err(ImportError::Line {
                line,
                message: format!(
                    "expected 4 or 5 tab-separated fields (peer, account, protocol, fingerprint, trust), found {}",
                    f.len()
                ),
            });
        }
        let fingerprint = Fingerprint::from_hex(f[3]).ok_or_else(|| ImportError::Line {
            line,
            message: format!("bad fingerprint {:?}: expected 40 hex digits", f[3]),
        })?;
        out.push(LibotrFingerprint {
            peer: f[0].to_owned(),
            account: f[1].to_owned(),
            protocol: f[2].to_owned(),
            fingerprint,
            trust: f.get(4).map(|t| t.trim().to_owned()).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// One line of `otr.instance_tags`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibotrInstag {
    /// Our account.
    pub account: String,
    /// Protocol name.
    pub protocol: String,
    /// Our instance tag.
    pub tag: u32,
}

/// Reads libotr's `otr.instance_tags`.
pub fn parse_instance_tags(text: &str) -> Result<Vec<LibotrInstag>, ImportError> {
    let mut out = Vec::new();
    for (line, f) in lines(text) {
        let [account, protocol, tag] = f.as_slice() else {
            return Err(ImportError::Line {
                line,
                message: format!(
                    "expected 3 tab-separated fields (account, protocol, tag), found {}",
                    f.len()
                ),
            });
        };
        let tag = u32::from_str_radix(tag.trim(), 16)
            .ok()
            .filter(|t| *t >= 0x100)
            .ok_or_else(|| ImportError::Line {
                line,
                message: format!("bad instance tag {tag:?}: expected hex >= 100"),
            })?;
        out.push(LibotrInstag {
            account: (*account).to_owned(),
            protocol: (*protocol).to_owned(),
            tag,
        });
    }
    Ok(out)
}

/// Whether a libotr protocol name is XMPP (Pidgin `prpl-jabber`,
/// Profanity `xmpp`, mcabber `jabber`, …).
pub fn is_xmpp_protocol(protocol: &str) -> bool {
    matches!(
        protocol.to_ascii_lowercase().as_str(),
        "prpl-jabber" | "xmpp" | "jabber" | "prpl-xmpp"
    )
}

/// The bare JID of a libotr account or peer name (resource and a trailing
/// `/` dropped, lowercased), or `None` if it is not a JID with a local part.
pub fn bare_jid(name: &str) -> Option<String> {
    let name = name.trim().trim_end_matches('/');
    let jid = Jid::parse(name).ok()?;
    jid.local()?;
    Some(jid.bare().to_string().to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sexp_forms() {
        let v = parse_sexp(b"(a \"b\\x41\\n\" #0a0B# |AAE=| 3:x y 4\"abcd\" (c))").unwrap();
        let Sexp::List(l) = &v[0] else { panic!() };
        let atoms: Vec<Option<&[u8]>> = l.iter().map(Sexp::atom).collect();
        assert_eq!(atoms[0], Some(&b"a"[..]));
        assert_eq!(atoms[1], Some(&b"bA\n"[..]));
        assert_eq!(atoms[2], Some(&[0x0a, 0x0b][..]));
        assert_eq!(atoms[3], Some(&[0, 1][..]));
        assert_eq!(atoms[4], Some(&b"x y"[..]));
        assert_eq!(atoms[5], Some(&b"abcd"[..]));
        assert!(l[6].tagged("c").is_some());
    }

    #[test]
    fn sexp_errors() {
        for bad in [
            &b"(a"[..],
            b")",
            b"(\"abc)",
            b"(#0#)",
            b"(#zz#)",
            b"(9:ab)",
            b"(|!!|)",
        ] {
            assert!(
                parse_sexp(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "(".repeat(100) + &")".repeat(100);
        assert!(parse_sexp(deep.as_bytes()).is_err());
        assert!(parse_private_keys(b"(foo)").is_err());
        assert!(parse_private_keys(b"(privkeys (account (name \"a@b\")))").is_err());
    }

    #[test]
    fn fingerprints_and_tags() {
        let f = parse_fingerprints(
            "bob@example.org\talice@example.org/Home\tprpl-jabber\t0123456789abcdef0123456789abcdef01234567\tverified\n\
             carol@example.org\talice@example.org\txmpp\t0123456789ABCDEF0123456789ABCDEF01234567\t\n\
             dave@example.org\talice@example.org\txmpp\t0123456789ABCDEF0123456789ABCDEF01234567\n",
        )
        .unwrap();
        assert_eq!(f.len(), 3);
        assert!(f[0].is_verified());
        assert!(!f[1].is_verified());
        assert!(!f[2].is_verified());
        assert_eq!(f[0].fingerprint, f[1].fingerprint);
        assert!(parse_fingerprints("a\tb\tc\tnothex\t\n").is_err());
        let t = parse_instance_tags(
            "# WARNING! You shouldn't copy this file to another computer.\n\
             alice@example.org\tprpl-jabber\t8a3c1f02\n",
        )
        .unwrap();
        assert_eq!(t[0].tag, 0x8a3c_1f02);
        assert!(parse_instance_tags("alice\txmpp\t00000001\n").is_err());
        assert!(parse_instance_tags("alice\txmpp\n").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            bare_jid("Alice@Example.org/Gajim").as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(
            bare_jid("alice@example.org/").as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(bare_jid("example.org"), None);
        assert!(is_xmpp_protocol("prpl-jabber"));
        assert!(!is_xmpp_protocol("prpl-irc"));
    }
}
