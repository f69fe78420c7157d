//! OTR policies (spec §"Policies"), offered to users as the three
//! combinations libotr's clients offer.

use std::fmt;
use std::str::FromStr;

use super::message::Version;

/// A user-facing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// OTR only when a user asks for it (or the peer starts it).
    Manual,
    /// Advertise OTR with the whitespace tag and start it whenever the peer
    /// supports it; plaintext is still allowed.
    Opportunistic,
    /// Never send plaintext: messages are held until the session is private.
    #[default]
    Always,
}

impl Policy {
    /// ALLOW_V2.
    pub fn allow_v2(self) -> bool {
        true
    }

    /// ALLOW_V3.
    pub fn allow_v3(self) -> bool {
        true
    }

    /// Whether `v` may be used.
    pub fn allows(self, v: Version) -> bool {
        match v {
            Version::V2 => self.allow_v2(),
            Version::V3 => self.allow_v3(),
        }
    }

    /// The versions we offer, best first.
    pub fn versions(self) -> Vec<Version> {
        let mut v = Vec::with_capacity(2);
        if self.allow_v3() {
            v.push(Version::V3);
        }
        if self.allow_v2() {
            v.push(Version::V2);
        }
        v
    }

    /// The best version both we and an offer allow.
    pub fn choose(self, offered: &[Version]) -> Option<Version> {
        [Version::V3, Version::V2]
            .into_iter()
            .find(|v| self.allows(*v) && offered.contains(v))
    }

    /// REQUIRE_ENCRYPTION.
    pub fn require_encryption(self) -> bool {
        matches!(self, Policy::Always)
    }

    /// SEND_WHITESPACE_TAG.
    pub fn send_whitespace_tag(self) -> bool {
        !matches!(self, Policy::Manual)
    }

    /// WHITESPACE_START_AKE.
    pub fn whitespace_start_ake(self) -> bool {
        !matches!(self, Policy::Manual)
    }

    /// ERROR_START_AKE.
    pub fn error_start_ake(self) -> bool {
        !matches!(self, Policy::Manual)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Manual => "manual",
            Policy::Opportunistic => "opportunistic",
            Policy::Always => "always",
        })
    }
}

/// An unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy {0:?} (expected manual, opportunistic or always)")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "manual" => Ok(Policy::Manual),
            "opportunistic" => Ok(Policy::Opportunistic),
            "always" => Ok(Policy::Always),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_v3_and_falls_back_to_v2() {
        let p = Policy::Always;
        assert_eq!(p.choose(&[Version::V2, Version::V3]), Some(Version::V3));
        assert_eq!(p.choose(&[Version::V2]), Some(Version::V2));
        assert_eq!(p.choose(&[]), None);
    }

    #[test]
    fn parses_names() {
        assert_eq!("Always".parse::<Policy>().unwrap(), Policy::Always);
        assert!("sometimes".parse::<Policy>().is_err());
        assert!(!Policy::Manual.send_whitespace_tag());
        assert!(Policy::Always.require_encryption());
    }
}
