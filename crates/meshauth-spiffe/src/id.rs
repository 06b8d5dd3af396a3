//! SPIFFE IDs and trust domains (SPIFFE-ID specification).
//!
//! Parsing is the `spiffe` crate's, which implements the character, segment and scheme rules;
//! these wrappers add what it leaves open: trust domains must be written in lowercase (it
//! silently lowercases), the whole ID is at most 2048 bytes (it accepts longer), and a trust
//! domain is given as a bare name, never as a URI.

use std::fmt;
use std::str::FromStr;

/// The SPIFFE-ID specification's limit on a whole ID.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The SPIFFE-ID specification's limit on a trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// A rule of the specification, as the `spiffe` crate reports it.
    #[error("{0}")]
    Spec(String),
    /// Uppercase letters in the trust domain.
    #[error("trust domain must be lowercase")]
    UppercaseTrustDomain,
    /// Longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long; the limit is 2048")]
    TooLong(usize),
    /// A trust domain given as a URI.
    #[error("give the trust domain as a bare name such as example.org, not a URI")]
    TrustDomainIsUri,
}

fn spec(e: spiffe::SpiffeIdError) -> SpiffeIdError {
    SpiffeIdError::Spec(e.to_string())
}

/// A trust domain name, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(spiffe::TrustDomain);

impl TrustDomain {
    /// The name.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`.
    pub fn id_string(&self) -> String {
        self.0.id_string()
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') || s.contains('/') {
            return Err(SpiffeIdError::TrustDomainIsUri);
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpiffeIdError::UppercaseTrustDomain);
        }
        spiffe::TrustDomain::new(s).map(TrustDomain).map_err(spec)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain>[/path]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    id: spiffe::SpiffeId,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    /// Its trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Its path, `""` for a trust domain's own ID, else starting with `/`.
    pub fn path(&self) -> &str {
        self.id.path()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let id = spiffe::SpiffeId::new(s).map_err(spec)?;
        // The crate lowercases the trust domain; the spec wants it written in lowercase.
        let authority = s.split_once("://").map_or("", |(_, rest)| rest);
        let authority = authority.split('/').next().unwrap_or("");
        if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpiffeIdError::UppercaseTrustDomain);
        }
        if !s.starts_with("spiffe://") {
            return Err(SpiffeIdError::Spec("scheme is missing or invalid".into()));
        }
        let trust_domain = TrustDomain(id.trust_domain().clone());
        Ok(SpiffeId { id, trust_domain })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.id, f)
    }
}

/// `spiffe://<td>/node/<name>`: the ID of the agent on node `name`.
pub fn node_spiffe_id(td: &TrustDomain, name: &str) -> Result<SpiffeId, SpiffeIdError> {
    format!("spiffe://{td}/node/{name}").parse()
}

/// `spiffe://<td>/identity/<id>`: the ID of numeric security identity `id`.
pub fn identity_spiffe_id(td: &TrustDomain, id: u32) -> SpiffeId {
    #[allow(
        clippy::expect_used,
        reason = "a valid trust domain and a decimal segment always parse"
    )]
    format!("spiffe://{td}/identity/{id}")
        .parse()
        .expect("valid trust domain and numeric path")
}

/// A path namespace in which meshauth issues IDs itself, so that no registration entry may
/// claim an ID in it: an entry for one of these would let a workload pose as a meshauth
/// component, a node or a label identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedNamespace {
    /// The first path segment, with its leading `/`: the namespace is this path and everything
    /// under it.
    pub prefix: &'static str,
    /// Who the IDs in it belong to, as the end of a sentence.
    pub owner: &'static str,
}

/// Every reserved namespace. The server's own ID, `spiffe://<td>/meshauth/server`, is in the
/// first; node SVIDs (`/node/<name>`) and identity SVIDs (`/identity/<n>`) in the others.
pub const RESERVED_NAMESPACES: &[ReservedNamespace] = &[
    ReservedNamespace {
        prefix: "/meshauth",
        owner: "meshauth's own components (the server is /meshauth/server)",
    },
    ReservedNamespace {
        prefix: "/node",
        owner: "nodes, which obtain them only by attesting",
    },
    ReservedNamespace {
        prefix: "/identity",
        owner: "label identities, which the server signs only for nodes hosting them",
    },
];

/// The reserved namespace `id`'s path falls in, if any. Whole segments are compared:
/// `/node/n1` and `/node` are reserved, `/nodes/n1` is not. Paths are case-sensitive, as
/// SPIFFE IDs are compared exactly.
pub fn reserved_namespace(id: &SpiffeId) -> Option<&'static ReservedNamespace> {
    let path = id.path();
    RESERVED_NAMESPACES.iter().find(|ns| {
        path.strip_prefix(ns.prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://example.org/ns/prod/sa/web-1_a.b",
            "spiffe://1.2.3.4/x",
            "spiffe://a-b_c.d/UPPER/path",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id: SpiffeId = "spiffe://example.org/a/b".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn invalid_ids() {
        let long_path = format!("spiffe://example.org/{}", "a".repeat(2049));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("example.org/x", "no scheme"),
            ("http://example.org/x", "wrong scheme"),
            ("spiffe:/example.org/x", "one slash"),
            ("spiffe://", "empty trust domain"),
            ("spiffe:///path", "empty trust domain with path"),
            ("spiffe://Example.org/x", "uppercase trust domain"),
            ("spiffe://example.org:8080/x", "port"),
            ("spiffe://user@example.org/x", "userinfo"),
            ("spiffe://example.org/a%20b", "percent-encoding"),
            (
                "spiffe://ex%41mple.org/x",
                "percent-encoding in trust domain",
            ),
            ("spiffe://example.org/x?q=1", "query"),
            ("spiffe://example.org/x#frag", "fragment"),
            ("spiffe://example.org/a//b", "empty segment"),
            ("spiffe://example.org/a/./b", "dot segment"),
            ("spiffe://example.org/a/../b", "dot-dot segment"),
            ("spiffe://example.org/a/", "trailing slash"),
            ("spiffe://example.org/a b", "space"),
            ("spiffe://example.org/é", "non-ASCII"),
            ("spiffe://[::1]/x", "IPv6 trust domain"),
            (&long_path, "longer than 2048 bytes"),
            (&long_td, "trust domain longer than 255 bytes"),
        ];
        for (s, why) in cases {
            assert!(s.parse::<SpiffeId>().is_err(), "{why}: {s:?} was accepted");
        }
    }

    #[test]
    fn length_limits_are_inclusive() {
        let prefix = "spiffe://example.org/";
        let at_limit = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(at_limit.len(), 2048);
        assert!(at_limit.parse::<SpiffeId>().is_ok());
        let td = "a".repeat(255);
        assert!(td.parse::<TrustDomain>().is_ok());
        assert!("a".repeat(256).parse::<TrustDomain>().is_err());
    }

    #[test]
    fn trust_domains() {
        assert_eq!(
            "example.org".parse::<TrustDomain>().unwrap().id_string(),
            "spiffe://example.org"
        );
        for bad in [
            "",
            "Example.org",
            "spiffe://example.org",
            "a/b",
            "a:1",
            "a b",
            "a%41",
        ] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn constructors() {
        let td: TrustDomain = "td.test".parse().unwrap();
        assert_eq!(
            node_spiffe_id(&td, "n1").unwrap().to_string(),
            "spiffe://td.test/node/n1"
        );
        assert!(node_spiffe_id(&td, "../x").is_err());
        assert_eq!(
            identity_spiffe_id(&td, 256).to_string(),
            "spiffe://td.test/identity/256"
        );
    }

    #[test]
    fn reserved_namespaces() {
        let ns = |s: &str| reserved_namespace(&s.parse().unwrap()).map(|n| n.prefix);
        assert_eq!(ns("spiffe://td/meshauth/server"), Some("/meshauth"));
        assert_eq!(ns("spiffe://td/meshauth/x/y"), Some("/meshauth"));
        assert_eq!(ns("spiffe://td/meshauth"), Some("/meshauth"));
        assert_eq!(ns("spiffe://td/node/n1"), Some("/node"));
        assert_eq!(ns("spiffe://td/identity/300"), Some("/identity"));
        for free in [
            "spiffe://td",
            "spiffe://td/web",
            "spiffe://td/nodes/n1",
            "spiffe://td/meshauthx",
            "spiffe://td/Node/n1",
            "spiffe://td/ns/node/n1",
            "spiffe://td/identity-300",
        ] {
            assert_eq!(ns(free), None, "{free}");
        }
        let td: TrustDomain = "td".parse().unwrap();
        assert!(reserved_namespace(&node_spiffe_id(&td, "n1").unwrap()).is_some());
        assert!(reserved_namespace(&identity_spiffe_id(&td, 7)).is_some());
    }
}
