//! Certificate files: init, add_node, load, and errors that name the file.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use understudy_net::certs::{self, Error, NodeSpec};
use understudy_net::Identity;

use crate::cluster;

#[test]
fn init_then_load_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        let identity = Identity::load(dir.path(), id).expect("load");
        assert_eq!(identity.id(), id);
    }
    for file in ["ca-key.pem", "node-1-key.pem", "node-3-key.pem"] {
        let mode = fs::metadata(dir.path().join(file))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} must be private");
    }
    let chain = fs::read_to_string(certs::node_cert_path(dir.path(), 2)).expect("chain");
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "node cert, then the CA"
    );
    assert!(
        !dir.path().join("ca.pem.tmp").exists(),
        "no temporary file left behind"
    );
}

#[test]
fn init_refuses_to_replace_a_ca_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1]);
    let ca_before = fs::read(dir.path().join("ca.pem")).expect("ca");
    let err = certs::init(
        dir.path(),
        &[NodeSpec {
            id: 2,
            hosts: vec![],
        }],
    )
    .expect_err("must fail");
    assert!(
        matches!(&err, Error::Exists { path } if path.ends_with("ca-key.pem") || path.ends_with("ca.pem")),
        "{err}"
    );
    assert_eq!(
        fs::read(dir.path().join("ca.pem")).expect("ca"),
        ca_before,
        "refusal changed nothing"
    );
    assert!(!certs::node_cert_path(dir.path(), 2).exists());

    certs::init_replacing(
        dir.path(),
        &[NodeSpec {
            id: 1,
            hosts: vec![],
        }],
    )
    .expect("replace");
    assert_ne!(fs::read(dir.path().join("ca.pem")).expect("ca"), ca_before);
    Identity::load(dir.path(), 1).expect("the replaced node loads against the new CA");
}

#[test]
fn add_node_signs_with_the_existing_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    certs::add_node(
        dir.path(),
        &NodeSpec {
            id: 7,
            hosts: vec!["10.1.2.3".into(), "n7.example".into()],
        },
    )
    .expect("add node");
    assert_eq!(Identity::load(dir.path(), 7).expect("load").id(), 7);
    let again = certs::add_node(
        dir.path(),
        &NodeSpec {
            id: 7,
            hosts: vec![],
        },
    )
    .expect_err("must fail");
    assert!(matches!(again, Error::Exists { .. }), "{again}");
}

#[test]
fn invalid_node_lists_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let twice = [
        NodeSpec {
            id: 1,
            hosts: vec![],
        },
        NodeSpec {
            id: 1,
            hosts: vec![],
        },
    ];
    assert!(matches!(
        certs::init(dir.path(), &twice),
        Err(Error::InvalidSpec(_))
    ));
    let spoof = [NodeSpec {
        id: 1,
        hosts: vec!["node-2.understudy.cluster".into()],
    }];
    assert!(matches!(
        certs::init(dir.path(), &spoof),
        Err(Error::InvalidSpec(_))
    ));
    assert!(!dir.path().join("ca.pem").exists());
}

/// Asserts the error names `file` in its message.
fn names(err: &Error, file: &str) {
    assert!(
        err.to_string().contains(file),
        "error {err:?} should name {file}"
    );
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    cluster(other.path(), &[1]);
    let p = dir.path();

    let err = Identity::load(p, 9).expect_err("must fail");
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    names(&err, "node-9.pem");

    fs::write(p.join("node-1-key.pem"), "not a key").expect("write");
    let err = Identity::load(p, 1).expect_err("must fail");
    assert!(matches!(err, Error::NotPem { .. }), "{err}");
    names(&err, "node-1-key.pem");

    fs::copy(p.join("node-2-key.pem"), p.join("node-1-key.pem")).expect("copy");
    let err = Identity::load(p, 1).expect_err("must fail");
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    names(&err, "node-1-key.pem");

    fs::copy(other.path().join("node-1.pem"), p.join("node-1.pem")).expect("copy");
    fs::copy(
        other.path().join("node-1-key.pem"),
        p.join("node-1-key.pem"),
    )
    .expect("copy");
    let err = Identity::load(p, 1).expect_err("must fail");
    assert!(matches!(err, Error::NotFromCa { .. }), "{err}");
    names(&err, "node-1.pem");

    fs::copy(p.join("node-2.pem"), p.join("node-1.pem")).expect("copy");
    fs::copy(p.join("node-2-key.pem"), p.join("node-1-key.pem")).expect("copy");
    let err = Identity::load(p, 1).expect_err("must fail");
    assert!(
        matches!(
            err,
            Error::WrongNode {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
    names(&err, "node-1.pem");

    fs::write(p.join("node-2.pem"), "-----BEGIN CERTIFICATE-----\n!!!\n").expect("write");
    let err = Identity::load(p, 2).expect_err("must fail");
    assert!(matches!(err, Error::NotPem { .. }), "{err}");
    names(&err, "node-2.pem");

    fs::remove_file(p.join("ca.pem")).expect("remove");
    let err = Identity::load(p, 2).expect_err("must fail");
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    names(&err, "ca.pem");
}
