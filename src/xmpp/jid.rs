//! Jabber identifiers (RFC 7622 §3): `localpart@domainpart/resourcepart`.
//!
//! Deliberately simple: parts are split and length-checked (1..=1023 bytes
//! each, no empty parts), but no PRECIS/stringprep normalisation is done:
//! the proxy only compares JIDs that the server itself sends.

use std::fmt;

/// Maximum length of each part in bytes (RFC 7622 §3.2–3.4).
pub const MAX_PART_BYTES: usize = 1023;

/// Why a string is not a JID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    /// The domain part is empty.
    #[error("empty domain part")]
    EmptyDomain,
    /// A `@` with nothing before it.
    #[error("empty local part")]
    EmptyLocal,
    /// A `/` with nothing after it.
    #[error("empty resource part")]
    EmptyResource,
    /// One part is longer than 1023 bytes.
    #[error("a JID part is longer than 1023 bytes")]
    TooLong,
    /// A character not allowed in that part (whitespace, controls, or `@`/`/` in the domain).
    #[error("forbidden character in JID")]
    BadChar,
}

/// A bare (`local@domain`) or full (`local@domain/resource`) JID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    local: Option<String>,
    domain: String,
    resource: Option<String>,
}

fn check_part(s: &str, allow_space: bool) -> Result<(), JidError> {
    if s.len() > MAX_PART_BYTES {
        return Err(JidError::TooLong);
    }
    if s.chars()
        .any(|c| c.is_control() || (!allow_space && c.is_whitespace()))
    {
        return Err(JidError::BadChar);
    }
    Ok(())
}

impl Jid {
    /// Parses `[local@]domain[/resource]`.
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        // The resource may itself contain '@' and '/', so split it off first.
        let (bare, resource) = match s.split_once('/') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let (local, domain) = match bare.split_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, bare),
        };
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() {
            return Err(JidError::EmptyDomain);
        }
        check_part(domain, false)?;
        if domain.contains('@') {
            return Err(JidError::BadChar);
        }
        if let Some(l) = local {
            if l.is_empty() {
                return Err(JidError::EmptyLocal);
            }
            check_part(l, false)?;
            if l.contains(['"', '&', '\'', ':', '<', '>']) {
                return Err(JidError::BadChar);
            }
        }
        if let Some(r) = resource {
            if r.is_empty() {
                return Err(JidError::EmptyResource);
            }
            check_part(r, true)?;
        }
        Ok(Jid {
            local: local.map(str::to_owned),
            domain: domain.to_owned(),
            resource: resource.map(str::to_owned),
        })
    }

    /// The local part, if any.
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// The domain part.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The resource part, if any.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    /// True when a resource is present.
    pub fn is_full(&self) -> bool {
        self.resource.is_some()
    }

    /// The same JID without its resource.
    pub fn bare(&self) -> Jid {
        Jid {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }

    /// This bare JID with `resource` attached.
    pub fn with_resource(&self, resource: &str) -> Result<Jid, JidError> {
        if resource.is_empty() {
            return Err(JidError::EmptyResource);
        }
        check_part(resource, true)?;
        Ok(Jid {
            resource: Some(resource.to_owned()),
            ..self.bare()
        })
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Jid {
    type Err = JidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Jid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_bare_and_domain() {
        let j = Jid::parse("alice@example.org/phone").unwrap();
        assert_eq!(j.local(), Some("alice"));
        assert_eq!(j.domain(), "example.org");
        assert_eq!(j.resource(), Some("phone"));
        assert_eq!(j.to_string(), "alice@example.org/phone");
        assert_eq!(j.bare().to_string(), "alice@example.org");
        assert!(!j.bare().is_full());
        let d = Jid::parse("example.org").unwrap();
        assert_eq!(d.local(), None);
        assert_eq!(d.to_string(), "example.org");
    }

    #[test]
    fn resource_may_hold_at_and_slash() {
        let j = Jid::parse("a@b/c@d/e f").unwrap();
        assert_eq!(j.resource(), Some("c@d/e f"));
        assert_eq!(j.domain(), "b");
    }

    #[test]
    fn rejects_empty_and_long_parts() {
        assert_eq!(Jid::parse(""), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("@b"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@b/"), Err(JidError::EmptyResource));
        assert_eq!(Jid::parse("a@/r"), Err(JidError::EmptyDomain));
        let long = "x".repeat(1024);
        assert_eq!(Jid::parse(&format!("{long}@b")), Err(JidError::TooLong));
        assert!(Jid::parse(&format!("{}@b", "x".repeat(1023))).is_ok());
        assert_eq!(Jid::parse("a b@c"), Err(JidError::BadChar));
        assert_eq!(Jid::parse("a@b@c"), Err(JidError::BadChar));
    }

    #[test]
    fn with_resource_and_fromstr() {
        let j: Jid = "bob@x.test".parse().unwrap();
        assert_eq!(j.with_resource("r1").unwrap().to_string(), "bob@x.test/r1");
        assert!(j.with_resource("").is_err());
    }
}
