//! SPIFFE for meshauth: identifiers, X.509-SVID validation and trust bundles.
//!
//! Pure: no I/O, no clocks (validation takes `now`), no panics on any input.
//!
//! # Layout
//! - [`id`]: [`SpiffeId`] and [`TrustDomain`] with every rule of the SPIFFE-ID specification;
//!   the path namespaces meshauth reserves for itself ([`reserved_namespace`]).
//! - [`svid`]: [`validate_x509_svid`] with every rule of the X509-SVID specification.
//! - [`bundle`]: [`X509Bundle`] in the SPIFFE bundle format (JWKS) and as PEM.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bundle;
pub mod id;
pub mod svid;

pub use bundle::{BundleError, X509Bundle};
pub use id::{
    RESERVED_NAMESPACES, ReservedNamespace, SpiffeId, SpiffeIdError, TrustDomain,
    identity_spiffe_id, node_spiffe_id, reserved_namespace,
};
pub use svid::{
    SvidError, SvidRejectReason, VerifiedSvid, not_after_of, serial_of, spiffe_id_of,
    validate_x509_svid,
};
