//! TLS policy for node links: certificates must chain to the cluster CA and carry exactly one
//! node identity, and a client gets the node it asked for.
//!
//! This module owns the node-name encoding (`node-<id>.understudy.cluster`, see
//! [`crate::certs`]), the rustls verifiers that enforce it on both sides of a handshake, and
//! the rustls configurations built from an [`Identity`]. [`crate::certs`] uses the same
//! verifiers to check files at load time, so a file that loads is one peers accept. Sockets
//! and QUIC are left to [`crate::transport`].

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::certs::{Identity, NODE_NAME_DOMAIN};

/// Why a certificate is not an acceptable node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertProblem {
    NotFromCa(String),
    NoNodeIdentity(String),
    WrongNode { found: u64 },
    Invalid(String),
}

/// The DNS name that encodes node `id`.
pub(crate) fn node_name(id: u64) -> String {
    format!("node-{id}.{NODE_NAME_DOMAIN}")
}

/// The node id a certificate proves: its one canonical node name.
///
/// Does not check the chain; call it on verified certificates or local files only.
pub(crate) fn node_id_of(cert: &CertificateDer<'_>) -> Result<u64, String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let mut found = None;
    for name in parsed.valid_dns_names() {
        match classify(name) {
            Name::Other => {}
            Name::Node(id) => {
                if let Some(first) = found.replace(id) {
                    return Err(format!("names two nodes ({first} and {id})"));
                }
            }
            Name::Malformed => {
                return Err(format!(
                    "{name:?} lies under {NODE_NAME_DOMAIN} but is no node name"
                ))
            }
        }
    }
    found.ok_or_else(|| format!("no node-<id>.{NODE_NAME_DOMAIN} name"))
}

/// Checks a node's chain against the CA for node `id`, the way peers will.
pub(crate) fn check_node_cert(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    id: u64,
) -> Result<(), CertProblem> {
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| CertProblem::Invalid("empty chain".into()))?;
    let found = node_id_of(end_entity).map_err(CertProblem::NoNodeIdentity)?;
    if found != id {
        return Err(CertProblem::WrongNode { found });
    }
    let verifiers = Verifiers::new(ca).map_err(CertProblem::Invalid)?;
    let now = UnixTime::now();
    let name = server_name(id).map_err(CertProblem::Invalid)?;
    verifiers
        .server
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .map_err(problem)?;
    verifiers
        .client
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(problem)?;
    Ok(())
}

/// Whether the private key belongs to the chain's first certificate.
pub(crate) fn key_matches(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'static>) -> bool {
    let provider = provider();
    let Ok(signing_key) = provider.key_provider.load_private_key(key.clone_key()) else {
        return false;
    };
    rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key)
        .keys_match()
        .is_ok()
}

/// rustls configuration for one node: a server config accepting every ALPN in `alpns`, and a
/// client config per ALPN.
pub(crate) fn server_config(
    identity: &Identity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, String> {
    let verifiers = Verifiers::new(identity.ca())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifiers.client)
        .with_single_cert(identity.chain().to_vec(), identity.key())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    // No resumption: every connection proves both certificates afresh. Links are long-lived,
    // so a full handshake (about 2 ms) on reconnect costs nothing that matters.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// rustls client configuration offering one ALPN.
pub(crate) fn client_config(
    identity: &Identity,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, String> {
    let verifiers = Verifiers::new(identity.ca())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifiers.server)
        .with_client_auth_cert(identity.chain().to_vec(), identity.key())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The server name a client asks for when it dials node `id`.
pub(crate) fn server_name(id: u64) -> Result<ServerName<'static>, String> {
    ServerName::try_from(node_name(id)).map_err(|e| e.to_string())
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::NotFromCa(why) => write!(f, "not from the cluster CA: {why}"),
            CertProblem::NoNodeIdentity(why) => write!(f, "no node identity: {why}"),
            CertProblem::WrongNode { found } => write!(f, "certificate is for node {found}"),
            CertProblem::Invalid(why) => write!(f, "{why}"),
        }
    }
}

/// How a DNS name from a certificate relates to node identities.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    /// Not under the node domain: a host name, ignored.
    Other,
    /// A canonical node name.
    Node(u64),
    /// Under the node domain but not a canonical node name (wildcard, leading zeros, ...).
    Malformed,
}

fn classify(name: &str) -> Name {
    let lower = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let Some(label) = lower.strip_suffix(NODE_NAME_DOMAIN) else {
        return Name::Other;
    };
    let Some(label) = label.strip_suffix('.') else {
        // "understudy.cluster" itself is reserved; "xunderstudy.cluster" is someone else's.
        return if label.is_empty() {
            Name::Malformed
        } else {
            Name::Other
        };
    };
    let Some(digits) = label.strip_prefix("node-") else {
        return Name::Malformed;
    };
    match digits.parse::<u64>() {
        Ok(id) if id.to_string() == digits => Name::Node(id),
        _ => Name::Malformed,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn problem(e: rustls::Error) -> CertProblem {
    let foreign = match &e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            other.downcast_ref::<Refusal>().is_some_and(|r| r.foreign)
        }
        other => is_foreign(other),
    };
    if foreign {
        CertProblem::NotFromCa(e.to_string())
    } else {
        CertProblem::Invalid(e.to_string())
    }
}

/// Whether a chain failed for want of the cluster CA.
fn is_foreign(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
                | CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        )
    )
}

/// Both verifiers, built on the one cluster CA.
struct Verifiers {
    server: Arc<NodeServerVerifier>,
    client: Arc<NodeClientVerifier>,
}

impl Verifiers {
    fn new(ca: &CertificateDer<'static>) -> Result<Verifiers, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| format!("cluster CA certificate: {e}"))?;
        let roots = Arc::new(roots);
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| e.to_string())?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Verifiers {
            server: Arc::new(NodeServerVerifier { inner: server }),
            client: Arc::new(NodeClientVerifier { inner: client }),
        })
    }
}

/// Client side: the server chains to the CA and is the node the client dialled.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

/// Server side: the client chains to the CA and has a node identity.
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

/// A verifier's refusal, carried through rustls as `CertificateError::Other`.
struct Refusal {
    /// The chain does not lead to the cluster CA.
    foreign: bool,
    why: String,
}

// rustls shows `CertificateError::Other` with `{:?}`: make that the plain sentence.
impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for Refusal {}

/// Says in words that a chain failed for want of the cluster CA. Every cluster's CA has the
/// same subject, so a foreign certificate shows up as a bad signature, which reads like
/// corruption rather than "wrong cluster".
fn explain(e: rustls::Error) -> rustls::Error {
    if !is_foreign(&e) {
        return e;
    }
    let why = format!("not signed by this cluster's CA ({e})");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal {
        foreign: true,
        why,
    }))))
}

fn refuse(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal {
        foreign: false,
        why,
    }))))
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => match classify(name.as_ref()) {
                Name::Node(id) => id,
                _ => return Err(refuse(format!("{name:?} is not a node name"))),
            },
            other => return Err(refuse(format!("{other:?} is not a node name"))),
        };
        // Chain and name first: nothing in an unverified certificate is worth reading.
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(explain)?;
        let found = node_id_of(end_entity).map_err(refuse)?;
        if found != expected {
            return Err(refuse(format!(
                "expected node {expected}, the certificate is for node {found}"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(explain)?;
        node_id_of(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        for id in [0, 1, 42, u64::MAX] {
            assert_eq!(classify(&node_name(id)), Name::Node(id));
        }
        assert_eq!(classify("NODE-7.Understudy.Cluster."), Name::Node(7));
    }

    #[test]
    fn only_canonical_node_names_count() {
        assert_eq!(classify("node-07.understudy.cluster"), Name::Malformed);
        assert_eq!(classify("node-+7.understudy.cluster"), Name::Malformed);
        assert_eq!(classify("*.understudy.cluster"), Name::Malformed);
        assert_eq!(
            classify("node-1.node-2.understudy.cluster"),
            Name::Malformed
        );
        assert_eq!(classify("understudy.cluster"), Name::Malformed);
        assert_eq!(
            classify("node-18446744073709551616.understudy.cluster"),
            Name::Malformed
        );
        assert_eq!(classify("db1.example.com"), Name::Other);
        assert_eq!(classify("xunderstudy.cluster"), Name::Other);
    }
}
