//! The meshauth CA: issues X.509-SVIDs from CSRs and rotates its own authority.
//!
//! Pure: time is a parameter, there is no I/O; the server persists the [`CaJournal`].
//!
//! # Rotation
//! Each authority lives `ca_ttl`. When the active one passes half its life a successor is
//! *prepared* and published in the bundle at once (so that relying parties learn it long before
//! it signs anything); when the active one is within 1/6 of its life of expiry the prepared one
//! becomes *active* and the former active one becomes *old*. Old authorities stay in the bundle
//! until they expire, so every SVID issued before the switch keeps validating. An SVID never
//! outlives the authority that signs it.
//!
//! # Layout
//! - [`CaConfig`], [`Ca`]: configuration and the CA itself.
//! - [`IssuedSvid`], [`RotationEvent`], [`AuthorityInfo`]: what it hands out and reports.
//! - [`CaJournal`]: the persisted form.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod authority;
mod journal;

use std::fmt;
use std::time::{Duration, SystemTime};

use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use rustls_pki_types::CertificateDer;

use authority::Authority;
pub use authority::is_dns_name;
pub use journal::{CaJournal, JournalAuthority};

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR does not parse or its signature is wrong.
    #[error("invalid CSR: {0} (send a PKCS#10 request signed by the key to certify)")]
    InvalidCsr(String),
    /// The requested ID belongs to another trust domain.
    #[error("{id} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The requested ID.
        id: SpiffeId,
        /// This CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The requested ID has no path (it would be the trust domain itself).
    #[error("{0} has no path; an SVID needs one")]
    NoPath(SpiffeId),
    /// A DNS name that is not one.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// An SVID lifetime the CA does not sign: zero, or reaching past what a clock can hold.
    #[error("cannot sign an SVID with a TTL of {secs}s: {why}")]
    InvalidTtl {
        /// The TTL asked for, in whole seconds.
        secs: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// A validity time outside what a certificate can carry (years 0 to 9999).
    #[error(
        "{what} falls outside the years 0 to 9999 a certificate can carry: check the clock and the configured lifetimes"
    )]
    TimeOutOfRange {
        /// Which time.
        what: &'static str,
    },
    /// No authority can sign now (all expired).
    #[error(
        "no active CA authority: every authority has expired; the server replaces them at its next CA tick"
    )]
    NoActiveAuthority,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// The journal does not describe a usable CA.
    #[error("CA journal is invalid: {0}")]
    Journal(String),
}

/// The CA's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain it signs for.
    pub trust_domain: TrustDomain,
    /// Lifetime of each authority (default 24 h).
    pub ca_ttl: Duration,
    /// Default SVID lifetime (default 1 h).
    pub svid_ttl: Duration,
    /// How far NotBefore is set in the past, for clock skew (default 10 s).
    pub backdate: Duration,
}

impl CaConfig {
    /// Defaults for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        CaConfig {
            trust_domain,
            ca_ttl: Duration::from_secs(24 * 3600),
            svid_ttl: Duration::from_secs(3600),
            backdate: Duration::from_secs(10),
        }
    }

    /// With another authority lifetime.
    pub fn with_ca_ttl(mut self, ttl: Duration) -> Self {
        self.ca_ttl = ttl;
        self
    }

    /// With another default SVID lifetime.
    pub fn with_svid_ttl(mut self, ttl: Duration) -> Self {
        self.svid_ttl = ttl;
        self
    }
}

/// The state of an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Retired from signing, published until it expires.
    Old,
}

impl fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthorityState::Prepared => "prepared",
            AuthorityState::Active => "active",
            AuthorityState::Old => "old",
        })
    }
}

/// What the CA reports about an authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// Its state.
    pub state: AuthorityState,
    /// Its serial (hex).
    pub serial: String,
    /// Its expiry.
    pub not_after: SystemTime,
}

/// A rotation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationEvent {
    /// A successor was created and published.
    Prepared {
        /// Its serial.
        serial: String,
    },
    /// The successor now signs; the former active authority is old.
    Activated {
        /// The new active authority.
        serial: String,
    },
    /// An expired authority left the bundle.
    Removed {
        /// Its serial.
        serial: String,
    },
    /// Every authority had expired (the server was down longer than a CA lifetime): a new one
    /// signs now, cross-signed by the last one to expire, so that agents that trust only the
    /// old bundle can still verify the server ([`Ca::continuity_chain`]).
    Restarted {
        /// The new authority.
        serial: String,
        /// The expired authority that cross-signed it.
        cross_signed_by: String,
    },
}

/// The cross-certificate that carries trust from an expired authority to the one that
/// replaced it after a long outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Continuity {
    /// The successor's certificate, issued by the expired authority.
    pub(crate) cert: CertificateDer<'static>,
    /// The successor's serial.
    pub(crate) endorsed: String,
    /// The expired authority's serial.
    pub(crate) by: String,
}

/// An SVID the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// Leaf only: the authority is in the bundle.
    pub chain: Vec<CertificateDer<'static>>,
    /// The ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// Its serial (hex).
    pub serial: String,
    /// Its expiry (never after the signing authority's).
    pub not_after: SystemTime,
}

/// The CA: its authorities and the bundle sequence.
pub struct Ca {
    config: CaConfig,
    authorities: Vec<Authority>,
    sequence: u64,
    continuity: Option<Continuity>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.config.trust_domain.to_string())
            .field("authorities", &self.authorities())
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl Ca {
    /// A new CA with one active authority valid from `now`.
    pub fn new(config: CaConfig, now: SystemTime) -> Result<Ca, CaError> {
        let first = Authority::generate(&config, AuthorityState::Active, now)?;
        Ok(Ca {
            config,
            authorities: vec![first],
            sequence: 1,
            continuity: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// Advances rotation to `now`; returns what changed (empty when nothing did).
    pub fn tick(&mut self, now: SystemTime) -> Result<Vec<RotationEvent>, CaError> {
        let mut events = Vec::new();
        // Drop expired authorities (never the last one standing: it is needed to report the
        // expiry clearly when signing).
        let before = self.authorities.len();
        // The last authority to expire, if every one did: it cross-signs the new one.
        let mut last: Option<Authority> = None;
        let mut kept = Vec::with_capacity(self.authorities.len());
        for a in std::mem::take(&mut self.authorities) {
            // X.509 validity includes the notAfter second.
            if a.not_after >= now {
                kept.push(a);
                continue;
            }
            events.push(RotationEvent::Removed {
                serial: a.serial.clone(),
            });
            if last.as_ref().is_none_or(|l| a.not_after > l.not_after) {
                last = Some(a);
            }
        }
        self.authorities = kept;
        if self.authorities.is_empty() {
            // Everything expired (the server was down longer than a CA lifetime): start over,
            // with the new authority cross-signed by the last one, whose key agents still
            // trust. That key is used for this one signature and then dropped with it.
            let fresh = Authority::generate(&self.config, AuthorityState::Active, now)?;
            match &last {
                Some(old) => {
                    self.continuity = Some(Continuity {
                        cert: old.cross_sign(&self.config, &fresh, now)?,
                        endorsed: fresh.serial.clone(),
                        by: old.serial.clone(),
                    });
                    events.push(RotationEvent::Restarted {
                        serial: fresh.serial.clone(),
                        cross_signed_by: old.serial.clone(),
                    });
                }
                None => events.push(RotationEvent::Activated {
                    serial: fresh.serial.clone(),
                }),
            }
            self.authorities.push(fresh);
        }
        // A cross-certificate lives as long as the authority it carries trust to.
        if let Some(c) = &self.continuity
            && !self.authorities.iter().any(|a| a.serial == c.endorsed)
        {
            self.continuity = None;
        }
        let active = self.active_index();
        if let Some(i) = active {
            let (nb, na) = (
                self.authorities[i].not_before,
                self.authorities[i].not_after,
            );
            let life = na.duration_since(nb).unwrap_or_default();
            let has_prepared = self
                .authorities
                .iter()
                .any(|a| a.state == AuthorityState::Prepared);
            // `nb + life / 2` is at most `na`, so it never overflows; checked all the same.
            if !has_prepared && now >= nb.checked_add(life / 2).unwrap_or(na) {
                let next = Authority::generate(&self.config, AuthorityState::Prepared, now)?;
                events.push(RotationEvent::Prepared {
                    serial: next.serial.clone(),
                });
                self.authorities.push(next);
            }
            let prepared = self
                .authorities
                .iter()
                .position(|a| a.state == AuthorityState::Prepared);
            if let Some(p) = prepared.filter(|_| now >= na.checked_sub(life / 6).unwrap_or(nb)) {
                self.authorities[i].state = AuthorityState::Old;
                self.authorities[p].state = AuthorityState::Active;
                events.push(RotationEvent::Activated {
                    serial: self.authorities[p].serial.clone(),
                });
            }
        } else if let Some(p) = self
            .authorities
            .iter()
            .position(|a| a.state == AuthorityState::Prepared)
        {
            // The active one expired before the prepared one took over (long downtime).
            self.authorities[p].state = AuthorityState::Active;
            events.push(RotationEvent::Activated {
                serial: self.authorities[p].serial.clone(),
            });
        }
        if !events.is_empty() || before != self.authorities.len() {
            self.sequence += 1;
        }
        Ok(events)
    }

    fn active_index(&self) -> Option<usize> {
        self.authorities
            .iter()
            .position(|a| a.state == AuthorityState::Active)
    }

    /// Signs the key of `csr_der` into an SVID for `spiffe_id`. Whatever names the CSR asks for
    /// are ignored: the SVID carries exactly the ID the caller authorized.
    ///
    /// The SVID lives `ttl` (default: the configured SVID TTL) but never past its authority.
    /// A TTL under one second, or one that reaches past the latest time this system can
    /// represent, is refused with [`CaError::InvalidTtl`]; nothing here panics on any TTL.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Option<Duration>,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if spiffe_id.trust_domain() != &self.config.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: spiffe_id.clone(),
                trust_domain: self.config.trust_domain.clone(),
            });
        }
        if spiffe_id.path().is_empty() {
            return Err(CaError::NoPath(spiffe_id.clone()));
        }
        let authority = self
            .active_index()
            .map(|i| &self.authorities[i])
            .filter(|a| a.not_after >= now)
            .ok_or(CaError::NoActiveAuthority)?;
        let ttl = ttl.unwrap_or(self.config.svid_ttl);
        authority.sign_svid(
            csr_der,
            spiffe_id,
            ttl,
            dns_names,
            now,
            self.config.backdate,
        )
    }

    /// What a TLS peer appends to an SVID of the active authority so that clients holding only
    /// the bundle from before a restart ([`RotationEvent::Restarted`]) verify it: the
    /// cross-certificate, while the authority it endorses is active. Empty otherwise.
    pub fn continuity_chain(&self) -> Vec<CertificateDer<'static>> {
        let active = self.active_index().map(|i| &self.authorities[i].serial);
        self.continuity
            .iter()
            .filter(|c| Some(&c.endorsed) == active)
            .map(|c| c.cert.clone())
            .collect()
    }

    /// The bundle: every authority that has not expired at `now`.
    pub fn bundle(&self, now: SystemTime) -> X509Bundle {
        X509Bundle {
            trust_domain: self.config.trust_domain.clone(),
            authorities: self
                .authorities
                .iter()
                .filter(|a| a.not_after >= now)
                .map(|a| a.cert.clone())
                .collect(),
            sequence: self.sequence,
            refresh_hint: Some(Duration::from_secs(300).min(self.config.ca_ttl / 10)),
        }
    }

    /// The authorities, oldest first.
    pub fn authorities(&self) -> Vec<AuthorityInfo> {
        self.authorities
            .iter()
            .map(|a| AuthorityInfo {
                state: a.state,
                serial: a.serial.clone(),
                not_after: a.not_after,
            })
            .collect()
    }
}
