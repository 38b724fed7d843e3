//! Cluster certificates: one certificate authority per cluster and one certificate per node.
//!
//! This module owns the files on disk: it creates the CA and the node certificates
//! ([`init`], [`add_node`]) and loads and checks a node's [`Identity`]. It never touches the
//! network; [`crate::transport`] turns an `Identity` into TLS configuration.
//!
//! # Files
//!
//! All files are PEM, in one directory:
//!
//! | file | holds | mode |
//! |---|---|---|
//! | `ca.pem` | the cluster CA certificate (self-signed) | 0644 |
//! | `ca-key.pem` | the CA's private key (PKCS#8) | 0600 |
//! | `node-<id>.pem` | the node's certificate, then the CA certificate (a chain) | 0644 |
//! | `node-<id>-key.pem` | the node's private key (PKCS#8) | 0600 |
//!
//! A node needs `ca.pem` and its own two files. `ca-key.pem` is needed only to sign
//! certificates for nodes that join later ([`add_node`]); keep it off the nodes if you can.
//!
//! # Identity encoding
//!
//! Keys are ECDSA P-256. A node certificate carries, as subject alternative names, exactly
//! one DNS name of the form `node-<id>.understudy.cluster` (`<id>` in canonical decimal: no
//! sign, no leading zeros), followed by the hosts the node is reached at (IP addresses and DNS
//! names, informational). The node id is the only thing peers check: the client of a link
//! asks for the server name `node-<id>.understudy.cluster`, and the server reads the client's
//! id from the same SAN. A certificate with no such name, with two, or with any other name
//! under `understudy.cluster` (a wildcard, say) has no node identity and is refused. Hosts
//! under `understudy.cluster` are therefore rejected when a certificate is made.
//!
//! Node certificates are usable for both TLS server and client authentication (every node is
//! both). The CA's subject is `CN=Understudy cluster CA`; [`add_node`] relies on it to sign
//! with an existing CA key.
//!
//! # Validity
//!
//! Certificates start one day in the past (clock skew between machines) and last
//! [`CA_VALIDITY_DAYS`] and [`NODE_VALIDITY_DAYS`]. They are long on purpose: there is no
//! rotation yet, and an expired certificate would take the cluster down.

use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};

use crate::tls;

/// The domain under which node names live: `node-<id>.understudy.cluster`.
pub const NODE_NAME_DOMAIN: &str = "understudy.cluster";

/// Common name of the cluster CA's subject.
pub const CA_COMMON_NAME: &str = "Understudy cluster CA";

/// How long the cluster CA certificate is valid.
pub const CA_VALIDITY_DAYS: i64 = 20 * 365;

/// How long a node certificate is valid.
pub const NODE_VALIDITY_DAYS: i64 = 10 * 365;

/// File name of the CA certificate.
pub const CA_FILE: &str = "ca.pem";

/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A node to make a certificate for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    /// The node id peers check.
    pub id: u64,
    /// IP addresses and DNS names the node is reached at (written as SANs, not checked).
    pub hosts: Vec<String>,
}

/// A node's credentials, checked: its certificate chains to the cluster CA, names this node
/// id, and matches the private key.
pub struct Identity {
    id: u64,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// What went wrong with certificate files. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: missing", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not PEM holding {expected}", path.display())]
    NotPem {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{}: the key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: not signed by the cluster CA in {}: {reason}", path.display(), ca.display())]
    NotFromCa {
        path: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("{}: the certificate has no node identity: {reason}", path.display())]
    NoNodeIdentity { path: PathBuf, reason: String },
    #[error("{}: the certificate is for node {found}, not node {expected}", path.display())]
    WrongNode {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: invalid certificate: {reason}", path.display())]
    InvalidCert { path: PathBuf, reason: String },
    #[error("{}: already exists; remove it or ask to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("invalid node list: {0}")]
    InvalidSpec(String),
    #[error("making a certificate: {0}")]
    Generate(String),
}

/// Creates a cluster CA and a certificate for each node in `dir` (created if missing).
///
/// Fails with [`Error::Exists`] if `dir` already holds a CA: a new CA would orphan every
/// certificate signed by the old one. Use [`init_replacing`] to do that on purpose. Fails with
/// [`Error::InvalidSpec`] on duplicate ids or a host that is neither an IP address nor a DNS
/// name, or that lies under [`NODE_NAME_DOMAIN`].
pub fn init(dir: &Path, nodes: &[NodeSpec]) -> Result<(), Error> {
    create(dir, nodes, false)
}

/// Like [`init`], but replaces an existing CA and existing node files.
pub fn init_replacing(dir: &Path, nodes: &[NodeSpec]) -> Result<(), Error> {
    create(dir, nodes, true)
}

/// Signs a certificate for a node joining later, with the CA in `dir`.
///
/// Fails if the CA files are missing or malformed, if the node's files already exist (remove
/// them to re-issue), or if the spec is invalid.
pub fn add_node(dir: &Path, spec: &NodeSpec) -> Result<(), Error> {
    check_specs(std::slice::from_ref(spec))?;
    for path in [node_cert_path(dir, spec.id), node_key_path(dir, spec.id)] {
        if path.exists() {
            return Err(Error::Exists { path });
        }
    }
    let ca_path = dir.join(CA_FILE);
    let ca_pem = read_to_string(&ca_path)?;
    let ca_der = read_ca(&ca_path)?;
    let key_path = dir.join(CA_KEY_FILE);
    let key_pem = read_to_string(&key_path)?;
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|_| Error::NotPem {
        path: key_path.clone(),
        expected: "a private key",
    })?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let node = issue(spec, &issuer)?;
    // The issuer was rebuilt from a fixed subject: prove the result chains to the CA on disk
    // before writing it, so a foreign ca.pem/ca-key.pem pair cannot yield a useless cert.
    tls::check_node_cert(&ca_der, &[node.cert.clone(), ca_der.clone()], spec.id).map_err(
        |problem| Error::NotFromCa {
            path: key_path.clone(),
            ca: ca_path.clone(),
            reason: format!("a certificate signed with this key does not verify: {problem}"),
        },
    )?;
    write_node(dir, spec.id, &node, &ca_pem, false)
}

/// Path of node `id`'s certificate chain in `dir`.
pub fn node_cert_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}.pem"))
}

/// Path of node `id`'s private key in `dir`.
pub fn node_key_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}-key.pem"))
}

impl Identity {
    /// Loads node `id`'s credentials from `dir` and checks them.
    ///
    /// Fails, naming the file, when a file is missing or unreadable, is not PEM of the
    /// expected kind, the key does not match the certificate, or the certificate is not signed
    /// by the CA in `ca.pem`, is outside its validity period, or is not for node `id`.
    pub fn load(dir: &Path, id: u64) -> Result<Identity, Error> {
        let ca_path = dir.join(CA_FILE);
        let cert_path = node_cert_path(dir, id);
        let key_path = node_key_path(dir, id);
        let ca = read_ca(&ca_path)?;
        let chain = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        if !tls::key_matches(&chain, &key) {
            return Err(Error::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        tls::check_node_cert(&ca, &chain, id).map_err(|problem| match problem {
            tls::CertProblem::NotFromCa(reason) => Error::NotFromCa {
                path: cert_path.clone(),
                ca: ca_path.clone(),
                reason,
            },
            tls::CertProblem::NoNodeIdentity(reason) => Error::NoNodeIdentity {
                path: cert_path.clone(),
                reason,
            },
            tls::CertProblem::WrongNode { found } => Error::WrongNode {
                path: cert_path.clone(),
                expected: id,
                found,
            },
            tls::CertProblem::Invalid(reason) => Error::InvalidCert {
                path: cert_path.clone(),
                reason,
            },
        })?;
        Ok(Identity { id, ca, chain, key })
    }

    /// The node id this identity proves.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    pub(crate) fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            id: self.id,
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A freshly issued node certificate and its key.
struct Issued {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn create(dir: &Path, nodes: &[NodeSpec], replace: bool) -> Result<(), Error> {
    check_specs(nodes)?;
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca_path = dir.join(CA_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    if !replace {
        // Check every target first so a refusal leaves the directory as it was.
        let mut targets = vec![ca_path.clone(), ca_key_path.clone()];
        for spec in nodes {
            targets.push(node_cert_path(dir, spec.id));
            targets.push(node_key_path(dir, spec.id));
        }
        if let Some(path) = targets.into_iter().find(|p| p.exists()) {
            return Err(Error::Exists { path });
        }
    }
    let ca_key = KeyPair::generate().map_err(generate)?;
    let mut params = ca_params()?;
    validity(&mut params, CA_VALIDITY_DAYS);
    let ca_cert = params.self_signed(&ca_key).map_err(generate)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(params, ca_key);
    let issued: Vec<Issued> = nodes
        .iter()
        .map(|spec| issue(spec, &issuer))
        .collect::<Result<_, _>>()?;
    // The key first: a ca.pem without its key is worse than nothing.
    write_file(&ca_key_path, &ca_key_pem, 0o600, replace)?;
    write_file(&ca_path, &ca_pem, 0o644, replace)?;
    for (spec, node) in nodes.iter().zip(&issued) {
        write_node(dir, spec.id, node, &ca_pem, replace)?;
    }
    Ok(())
}

/// The CA's parameters. `add_node` rebuilds the issuer from these, so the subject must stay
/// fixed.
fn ca_params() -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn issue(spec: &NodeSpec, issuer: &Issuer<'_, KeyPair>) -> Result<Issued, Error> {
    let mut names = vec![tls::node_name(spec.id)];
    names.extend(spec.hosts.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(generate)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, tls::node_name(spec.id));
    params.distinguished_name = name;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, NODE_VALIDITY_DAYS);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, issuer).map_err(generate)?;
    Ok(Issued {
        cert: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn validity(params: &mut CertificateParams, days: i64) {
    const DAY_SECS: i64 = 86_400;
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
        .unwrap_or(0);
    let at = |secs: i64| {
        time::OffsetDateTime::UNIX_EPOCH
            .checked_add(time::Duration::seconds(secs))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    params.not_before = at(now_secs - DAY_SECS);
    params.not_after = at(now_secs + days * DAY_SECS);
}

fn check_specs(nodes: &[NodeSpec]) -> Result<(), Error> {
    let mut ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidSpec(format!(
            "node id {} appears twice",
            pair[0]
        )));
    }
    for spec in nodes {
        for host in &spec.hosts {
            check_host(host).map_err(|why| {
                Error::InvalidSpec(format!("node {}: host {host:?} {why}", spec.id))
            })?;
        }
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), &'static str> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if DnsName::try_from(host).is_err() {
        return Err("is neither an IP address nor a DNS name");
    }
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if lower == NODE_NAME_DOMAIN || lower.ends_with(&format!(".{NODE_NAME_DOMAIN}")) {
        return Err("lies under the domain reserved for node identities");
    }
    Ok(())
}

fn write_node(
    dir: &Path,
    id: u64,
    node: &Issued,
    ca_pem: &str,
    replace: bool,
) -> Result<(), Error> {
    write_file(&node_key_path(dir, id), &node.key_pem, 0o600, replace)?;
    let chain = format!("{}{}", node.cert_pem, ca_pem);
    write_file(&node_cert_path(dir, id), &chain, 0o644, replace)
}

/// Writes `contents` to `path` whole or not at all: a temporary file with the final mode from
/// the start (a key is never readable by others, not even briefly), synced, then moved in
/// place. Without `replace`, an existing file is left alone and reported.
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    let placed = if replace {
        fs::rename(&tmp, path)
    } else {
        // A hard link fails if the target exists, unlike rename.
        fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp))
    };
    match placed {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                Err(Error::Exists {
                    path: path.to_owned(),
                })
            } else {
                Err(io_err(e))
            }
        }
    }
}

fn read_to_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> Error {
    match source.kind() {
        io::ErrorKind::NotFound => Error::Missing {
            path: path.to_owned(),
        },
        io::ErrorKind::InvalidData => Error::NotPem {
            path: path.to_owned(),
            expected: "text",
        },
        _ => Error::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Reads every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = fs::read(path).map_err(|source| io_error(path, source))?;
    let not_pem = || Error::NotPem {
        path: path.to_owned(),
        expected: "a certificate",
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(bytes.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(|_| not_pem())?;
    if certs.is_empty() {
        return Err(not_pem());
    }
    Ok(certs)
}

/// Reads the CA certificate: exactly one.
fn read_ca(path: &Path) -> Result<CertificateDer<'static>, Error> {
    let mut certs = read_certs(path)?;
    if certs.len() != 1 {
        return Err(Error::NotPem {
            path: path.to_owned(),
            expected: "exactly one certificate",
        });
    }
    Ok(certs.remove(0))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = fs::read(path).map_err(|source| io_error(path, source))?;
    match rustls_pemfile::private_key(&mut BufReader::new(bytes.as_slice())) {
        Ok(Some(key)) => Ok(key),
        Ok(None) | Err(_) => Err(Error::NotPem {
            path: path.to_owned(),
            expected: "a private key",
        }),
    }
}

fn generate(e: rcgen::Error) -> Error {
    Error::Generate(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_under_the_node_domain_are_refused() {
        assert!(check_host("node-3.understudy.cluster").is_err());
        assert!(check_host("UNDERSTUDY.cluster").is_err());
        assert!(check_host("10.0.0.1").is_ok());
        assert!(check_host("db1.example.com").is_ok());
        assert!(check_host("not a name").is_err());
    }
}
