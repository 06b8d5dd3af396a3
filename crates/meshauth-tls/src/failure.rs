//! Why a handshake failed, found in an error's source chain.
//!
//! A failed handshake reaches callers wrapped several times over (tonic, hyper, `io::Error`,
//! rustls), and rustls prints [`rustls::CertificateError::Other`] with `Debug`. Callers that
//! must tell a user what to check call [`HandshakeFailure::find`] on the error they got and
//! word the advice for their role (an agent dialing the server knows which flags matter).

use std::error::Error as StdError;
use std::fmt;

use meshauth_spiffe::{SpiffeId, SvidError};
use rustls::{AlertDescription, CertificateError};

/// A peer SVID that did not validate, carried in [`CertificateError::Other`].
///
/// Its `Debug` is its `Display`: rustls formats `Other` with `Debug`, so whoever prints the
/// rustls error as it is still reads a sentence, not a struct dump.
pub struct RejectedSvid(pub SvidError);

impl fmt::Display for RejectedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for RejectedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for RejectedSvid {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// Why a TLS handshake between SPIFFE peers failed, as one side saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer's SVID belongs to another trust domain than our bundle's.
    WrongTrustDomain {
        /// The SPIFFE ID in the peer's certificate (its trust domain is the peer's).
        peer_id: SpiffeId,
        /// The trust domain of our bundle.
        expected: String,
    },
    /// The peer's chain does not lead to any authority of our bundle.
    UnknownIssuer,
    /// The peer's SVID has expired.
    Expired,
    /// The peer's SVID is not valid yet.
    NotYetValid,
    /// The peer's SVID is valid, but its SPIFFE ID is not one we accept.
    IdNotAccepted,
    /// The peer's certificate is not a valid X.509-SVID, for the reason given.
    InvalidSvid(String),
    /// The peer sent no certificate.
    NoCertificate,
    /// The peer ended the handshake with this alert: it refused our certificate or our offer.
    Refused(AlertDescription),
    /// Another TLS failure, as rustls words it.
    Other(String),
}

impl HandshakeFailure {
    /// The first TLS failure in `err`'s source chain, if any.
    ///
    /// Looks inside `io::Error`s too, whose `source()` skips the error they wrap.
    pub fn find(err: &(dyn StdError + 'static)) -> Option<HandshakeFailure> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(HandshakeFailure::from_rustls(tls));
            }
            if let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                let inner: &(dyn StdError + 'static) = inner;
                if let Some(found) = HandshakeFailure::find(inner) {
                    return Some(found);
                }
            }
            next = e.source();
        }
        None
    }

    /// Classifies a rustls error.
    pub fn from_rustls(err: &rustls::Error) -> HandshakeFailure {
        match err {
            rustls::Error::InvalidCertificate(cert) => HandshakeFailure::from_certificate(cert),
            rustls::Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            rustls::Error::AlertReceived(alert) => HandshakeFailure::Refused(*alert),
            other => HandshakeFailure::Other(other.to_string()),
        }
    }

    fn from_certificate(cert: &CertificateError) -> HandshakeFailure {
        match cert {
            CertificateError::UnknownIssuer => HandshakeFailure::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                HandshakeFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeFailure::NotYetValid
            }
            CertificateError::ApplicationVerificationFailure => HandshakeFailure::IdNotAccepted,
            CertificateError::BadEncoding => {
                HandshakeFailure::InvalidSvid("the certificate is not valid DER X.509".into())
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<RejectedSvid>() {
                Some(RejectedSvid(SvidError::WrongTrustDomain { id, expected })) => {
                    HandshakeFailure::WrongTrustDomain {
                        peer_id: id.clone(),
                        expected: expected.clone(),
                    }
                }
                Some(RejectedSvid(e)) => HandshakeFailure::InvalidSvid(e.to_string()),
                None => HandshakeFailure::InvalidSvid(other.0.to_string()),
            },
            other => HandshakeFailure::InvalidSvid(format!("rustls: {other}")),
        }
    }
}

/// What an alert from the peer means for us, in words.
fn alert_text(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::UnknownCA => {
            "the peer does not trust our certificate: it was not issued by the peer's CA".into()
        }
        AlertDescription::CertificateExpired => {
            "the peer says our certificate has expired or is not valid yet".into()
        }
        AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnsupportedCertificate => "the peer rejected our certificate".into(),
        AlertDescription::AccessDenied => "the peer does not accept our SPIFFE ID".into(),
        AlertDescription::CertificateRequired => "the peer requires a client certificate".into(),
        AlertDescription::NoApplicationProtocol => {
            "the peer speaks none of our application protocols (ALPN)".into()
        }
        AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
            "the peer and we share no TLS parameters (meshauth speaks TLS 1.3 only)".into()
        }
        other => format!("the peer ended the handshake (TLS alert {other:?})"),
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::WrongTrustDomain { peer_id, expected } => write!(
                f,
                "the peer's certificate is {peer_id}, of trust domain {}, not {expected}",
                peer_id.trust_domain()
            ),
            HandshakeFailure::UnknownIssuer => {
                f.write_str("the peer's certificate was not issued by any CA of our trust bundle")
            }
            HandshakeFailure::Expired => f.write_str("the peer's certificate has expired"),
            HandshakeFailure::NotYetValid => f.write_str("the peer's certificate is not valid yet"),
            HandshakeFailure::IdNotAccepted => {
                f.write_str("the peer's SPIFFE ID is not the one expected")
            }
            HandshakeFailure::InvalidSvid(why) => {
                write!(f, "the peer's certificate is not a valid X.509-SVID: {why}")
            }
            HandshakeFailure::NoCertificate => f.write_str("the peer sent no certificate"),
            HandshakeFailure::Refused(alert) => f.write_str(&alert_text(*alert)),
            HandshakeFailure::Other(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::sync::Arc;

    use super::*;

    fn wrong_td() -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            RejectedSvid(SvidError::WrongTrustDomain {
                id: "spiffe://a.test/meshauth/server".parse().unwrap(),
                expected: "b.test".into(),
            }),
        ))))
    }

    #[test]
    fn finds_the_failure_inside_io_errors_and_wrappers() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Wrapper(std::io::Error::other(wrong_td()));
        let found = HandshakeFailure::find(&err).unwrap();
        let HandshakeFailure::WrongTrustDomain { peer_id, expected } = &found else {
            panic!("{found:?}");
        };
        assert_eq!(peer_id.trust_domain().as_str(), "a.test");
        assert_eq!(expected, "b.test");
        assert_eq!(
            found.to_string(),
            "the peer's certificate is spiffe://a.test/meshauth/server, of trust domain a.test, not b.test"
        );
        let plain = std::io::Error::other("connection refused");
        assert_eq!(HandshakeFailure::find(&plain), None);
    }

    #[test]
    fn rustls_prints_a_rejected_svid_as_a_sentence() {
        let text = wrong_td().to_string();
        assert!(!text.contains('{'), "{text}");
        assert!(text.contains("is not in trust domain b.test"), "{text}");
    }

    #[test]
    fn alerts_and_certificate_errors() {
        assert_eq!(
            HandshakeFailure::from_rustls(&rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            )),
            HandshakeFailure::Refused(AlertDescription::UnknownCA)
        );
        assert_eq!(
            HandshakeFailure::from_rustls(&rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            HandshakeFailure::UnknownIssuer
        );
        assert!(
            HandshakeFailure::Refused(AlertDescription::UnknownCA)
                .to_string()
                .contains("not issued by the peer's CA")
        );
    }
}
