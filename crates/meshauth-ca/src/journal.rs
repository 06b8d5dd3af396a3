//! The CA's persisted form: each authority's certificate and private key, its state, and the
//! bundle sequence. The server stores it as JSON in its datastore (a file of mode 0600).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;

use crate::authority::Authority;
use crate::{AuthorityState, Ca, CaConfig, CaError};

/// The persisted CA. Holds private keys: store it where only the server can read it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CaJournal {
    /// The authorities, oldest first.
    pub authorities: Vec<JournalAuthority>,
    /// The bundle sequence.
    pub sequence: u64,
    /// The cross-certificate from an expired authority to its successor after a long outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuity: Option<JournalContinuity>,
}

/// The cross-certificate of a restart (no key: the expired authority's key is gone).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JournalContinuity {
    /// The cross-certificate, base64 DER.
    pub cert_der: String,
    /// Serial of the authority it endorses.
    pub endorsed_serial: String,
    /// Serial of the expired authority that signed it.
    pub by_serial: String,
}

impl std::fmt::Debug for CaJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaJournal")
            .field("authorities", &self.authorities.len())
            .field("sequence", &self.sequence)
            .finish()
    }
}

/// One authority in the journal.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct JournalAuthority {
    /// Its state.
    pub state: AuthorityState,
    /// Its certificate, base64 DER.
    pub cert_der: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl Ca {
    /// The persisted form.
    pub fn to_journal(&self) -> CaJournal {
        CaJournal {
            authorities: self
                .authorities
                .iter()
                .map(|a| JournalAuthority {
                    state: a.state,
                    cert_der: STANDARD.encode(a.cert.as_ref()),
                    key_pem: a.issuer.key().serialize_pem(),
                })
                .collect(),
            sequence: self.sequence,
            continuity: self.continuity.as_ref().map(|c| JournalContinuity {
                cert_der: STANDARD.encode(c.cert.as_ref()),
                endorsed_serial: c.endorsed.clone(),
                by_serial: c.by.clone(),
            }),
        }
    }

    /// Restores a CA; the trust domain must be the one the journal was written for.
    pub fn from_journal(config: CaConfig, journal: CaJournal) -> Result<Ca, CaError> {
        let mut authorities = Vec::with_capacity(journal.authorities.len());
        for (i, a) in journal.authorities.into_iter().enumerate() {
            let der = STANDARD
                .decode(&a.cert_der)
                .map_err(|e| CaError::Journal(format!("authority {i}: certificate: {e}")))?;
            let key = KeyPair::from_pem(&a.key_pem)
                .map_err(|e| CaError::Journal(format!("authority {i}: key: {e}")))?;
            let cert = CertificateDer::from(der);
            let id = meshauth_spiffe::spiffe_id_of(&cert)
                .map_err(|e| CaError::Journal(format!("authority {i}: {e}")))?;
            if id.trust_domain() != &config.trust_domain {
                return Err(CaError::Journal(format!(
                    "authority {i} belongs to trust domain {}, not {}: use the data dir of that trust domain",
                    id.trust_domain(),
                    config.trust_domain
                )));
            }
            authorities.push(Authority::from_parts(a.state, cert, key)?);
        }
        if authorities.is_empty() {
            return Err(CaError::Journal("no authorities".into()));
        }
        let continuity = journal
            .continuity
            .map(|c| {
                STANDARD
                    .decode(&c.cert_der)
                    .map(|der| crate::Continuity {
                        cert: CertificateDer::from(der),
                        endorsed: c.endorsed_serial,
                        by: c.by_serial,
                    })
                    .map_err(|e| CaError::Journal(format!("cross-certificate: {e}")))
            })
            .transpose()?;
        Ok(Ca {
            config,
            authorities,
            sequence: journal.sequence,
            continuity,
        })
    }
}
