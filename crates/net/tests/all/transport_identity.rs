//! Links refuse peers that cannot prove the right node identity from the cluster CA.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use understudy_net::certs;
use understudy_net::transport::Error;
use understudy_net::{Channel, Config, Transport};

use crate::{cluster, identity, loopback, serving, Echo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_from_another_ca_is_refused_both_ways() {
    let ours = tempfile::tempdir().expect("tempdir");
    let theirs = tempfile::tempdir().expect("tempdir");
    cluster(ours.path(), &[1, 2]);
    cluster(theirs.path(), &[1, 2]);
    let echo = Arc::new(Echo::default());
    let (server, _serve) = serving(
        &identity(ours.path(), 2),
        loopback(),
        Config::default(),
        echo.clone(),
    );
    let addr = server.local_addr().expect("addr");

    // Our server refuses a client that trusts our CA but presents the other cluster's node 1.
    let (chain, key) = node_files(theirs.path(), 1);
    let err = raw_request(ours.path(), chain, key, addr)
        .await
        .expect_err("must fail");
    assert!(
        err.contains("not signed by this cluster's CA"),
        "server side: {err}"
    );
    assert_eq!(
        echo.calls.load(Ordering::Relaxed),
        0,
        "no request reached the handler"
    );

    // Our client refuses a server from the other cluster claiming to be node 2.
    let (impostor, _serve_impostor) = serving(
        &identity(theirs.path(), 2),
        loopback(),
        Config::default(),
        Arc::new(Echo::default()),
    );
    let client =
        Transport::bind(&identity(ours.path(), 1), loopback(), Config::default()).expect("bind");
    let err = client
        .request(
            2,
            impostor.local_addr().expect("addr"),
            Channel::Control,
            Bytes::from_static(b"x"),
        )
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Refused { .. }), "client side: {err}");
    assert!(
        err.to_string().contains("not signed by this cluster's CA"),
        "client side: {err}"
    );

    // Two whole nodes of different clusters cannot talk either.
    let intruder =
        Transport::bind(&identity(theirs.path(), 1), loopback(), Config::default()).expect("bind");
    let err = intruder
        .request(2, addr, Channel::Control, Bytes::from_static(b"x"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Refused { .. }), "{err}");

    // The refusals cost nothing: the real pair still talks.
    let answer = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"ok"))
        .await
        .expect("ok");
    assert_eq!(answer, &b"1/control/ok"[..]);
    assert_eq!(echo.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_for_another_node_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2, 3]);
    let echo = Arc::new(Echo::default());
    let (two, _serve) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        echo.clone(),
    );
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let err = client
        .request(
            3,
            two.local_addr().expect("addr"),
            Channel::Control,
            Bytes::from_static(b"x"),
        )
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains("node-3"),
        "the error says which node was expected: {err}"
    );
    assert_eq!(echo.calls.load(Ordering::Relaxed), 0);
}

/// Signs a certificate with the cluster CA in `dir` for the given SANs: a CA-issued
/// certificate that `certs` itself would never make.
fn sign(dir: &Path, sans: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::from_pem(
        &fs::read_to_string(dir.join(certs::CA_KEY_FILE)).expect("ca key"),
    )
    .expect("ca key parses");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, certs::CA_COMMON_NAME);
    ca.distinguished_name = name;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![cert.der().clone()], key)
}

/// Node `id`'s chain and key as written by `certs`.
fn node_files(dir: &Path, id: u64) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let pem = fs::read(certs::node_cert_path(dir, id)).expect("chain");
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .expect("parses");
    let pem = fs::read(certs::node_key_path(dir, id)).expect("key");
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .expect("parses")
        .expect("a key");
    (chain, key)
}

fn ca_der(dir: &Path) -> CertificateDer<'static> {
    let pem = fs::read(dir.join(certs::CA_FILE)).expect("ca");
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("one cert")
        .expect("parses");
    cert
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A bare quinn client presenting `chain` and trusting the cluster CA: one request.
async fn raw_request(
    dir: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    addr: SocketAddr,
) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der(dir)).expect("root");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    tls.alpn_protocols = vec![Channel::Control.alpn().to_vec()];
    let config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("quic tls")));
    let endpoint = quinn::Endpoint::client(loopback()).expect("endpoint");
    let conn = endpoint
        .connect_with(config, addr, "node-2.understudy.cluster")
        .map_err(|e| format!("{e:?}"))?
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("{e:?}"))?;
    send.write_all(b"hello")
        .await
        .map_err(|e| format!("{e:?}"))?;
    send.finish().map_err(|e| format!("{e:?}"))?;
    recv.read_to_end(1 << 10)
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_node_identity_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let echo = Arc::new(Echo::default());
    let (server, _serve) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        echo.clone(),
    );
    let addr = server.local_addr().expect("addr");

    // Same CA, valid chain, but no node-<id> name.
    let (chain, key) = sign(dir.path(), &["127.0.0.1", "anonymous.example"]);
    let err = raw_request(dir.path(), chain, key, addr)
        .await
        .expect_err("must fail");
    assert!(
        err.contains("no node-<id>"),
        "refused for its identity: {err}"
    );

    // A certificate naming two nodes has no single identity either.
    let (chain, key) = sign(
        dir.path(),
        &["node-1.understudy.cluster", "node-3.understudy.cluster"],
    );
    let err = raw_request(dir.path(), chain, key, addr)
        .await
        .expect_err("must fail");
    assert!(err.contains("two nodes"), "refused for its identity: {err}");
    assert_eq!(
        echo.calls.load(Ordering::Relaxed),
        0,
        "no request reached the handler"
    );

    // A proper node certificate through the same bare client is served.
    let (chain, key) = sign(dir.path(), &["node-1.understudy.cluster"]);
    let answer = raw_request(dir.path(), chain, key, addr)
        .await
        .expect("identified client");
    assert_eq!(answer, b"1/control/hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_naming_two_nodes_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    // Valid for the name node-2 (so the CA and name checks pass) but also names node 3.
    let (chain, key) = sign(
        dir.path(),
        &["node-2.understudy.cluster", "node-3.understudy.cluster"],
    );
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    tls.alpn_protocols = Channel::ALL.iter().map(|c| c.alpn().to_vec()).collect();
    let config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls).expect("quic tls"),
    ));
    let endpoint = quinn::Endpoint::server(config, loopback()).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let _ = incoming.await;
        }
    });
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let err = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"x"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(err.to_string().contains("two nodes"), "{err}");
}
