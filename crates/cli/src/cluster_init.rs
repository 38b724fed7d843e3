//! `understudy cluster init --nodes 1@10.0.0.1:7301,... --out DIR`: everything a cluster
//! of machines needs before its first start, in one directory: the cluster CA and each
//! node's certificate (`certs/`, written by `understudy_net::certs`), an admin token
//! (`admin-token`) and one config file per node (`node-<id>.toml`) that
//! `understudy node --config` reads as it is. This module only writes files; the node
//! checks what it reads as it checks any config.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use understudy::cluster::Member;

/// What `cluster init --nodes` writes, and where the files will be on each machine.
#[derive(Debug)]
pub struct Plan {
    /// The directory to write into.
    pub out: PathBuf,
    /// Where the files will be on every machine (absolute); the configs name their
    /// certificates and token there. `out` itself when not given.
    pub install_dir: Option<PathBuf>,
    /// Each node's data directory on its machine; `<install_dir>/data-<id>` when not
    /// given (which also lets several nodes share one machine).
    pub data_dir: Option<PathBuf>,
    /// Listen on every interface (`0.0.0.0`, same ports) instead of each member's own
    /// address: for machines that reach each other through addresses they do not hold.
    pub listen_any: bool,
    /// The founding members, as `--peers` gives them.
    pub members: Vec<Member>,
    /// Replace certificates `out` already holds.
    pub force: bool,
}

/// One node's files, as written.
#[derive(Debug)]
pub struct Written {
    pub id: u64,
    /// The config's path on the node's machine.
    pub config_installed: PathBuf,
    pub host: String,
}

/// The file's layout: what `Config` reads (its other settings keep their defaults).
#[derive(Serialize)]
struct NodeFile<'a> {
    data_dir: PathBuf,
    listen: SocketAddr,
    admin_token_file: PathBuf,
    cluster: ClusterSection<'a>,
}

#[derive(Serialize)]
struct ClusterSection<'a> {
    node_id: u64,
    peer_listen: SocketAddr,
    certs_dir: PathBuf,
    members: &'a [Member],
}

/// Bytes of randomness in a generated admin token.
const TOKEN_BYTES: usize = 32;

/// Write the certificates, the admin token and every node's config under `plan.out`.
///
/// Fails when a member's HTTP address is not `IP:PORT`, the install or data directory
/// is not absolute, a file cannot be written, or `out` already holds a CA (unless
/// `force`).
pub fn write(plan: &Plan) -> anyhow::Result<Vec<Written>> {
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("cannot create {}", plan.out.display()))?;
    let out = std::fs::canonicalize(&plan.out)
        .with_context(|| format!("cannot resolve {}", plan.out.display()))?;
    let install = plan.install_dir.clone().unwrap_or_else(|| out.clone());
    if !install.is_absolute() {
        bail!("--install-dir {}: give an absolute path", install.display());
    }
    if let Some(data) = &plan.data_dir {
        if !data.is_absolute() {
            bail!("--data-dir {}: give an absolute path", data.display());
        }
    }
    let specs: Vec<understudy_net::NodeSpec> = plan
        .members
        .iter()
        .map(|m| understudy_net::NodeSpec {
            id: m.id,
            hosts: vec![m.peer_addr.ip().to_string()],
        })
        .collect();
    let certs = out.join("certs");
    if plan.force {
        understudy_net::certs::init_replacing(&certs, &specs)?;
    } else {
        understudy_net::certs::init(&certs, &specs)?;
    }
    write_private(&out.join("admin-token"), &(new_token()? + "\n"))?;
    let mut written = Vec::new();
    for member in &plan.members {
        let http: SocketAddr = member.http_addr.parse().with_context(|| {
            format!(
                "node {}'s HTTP address {:?} is not IP:PORT",
                member.id, member.http_addr
            )
        })?;
        let (listen, peer_listen) = if plan.listen_any {
            (
                SocketAddr::from(([0, 0, 0, 0], http.port())),
                SocketAddr::from(([0, 0, 0, 0], member.peer_addr.port())),
            )
        } else {
            (http, member.peer_addr)
        };
        let file = NodeFile {
            data_dir: match &plan.data_dir {
                Some(dir) => dir.clone(),
                None => install.join(format!("data-{}", member.id)),
            },
            listen,
            admin_token_file: install.join("admin-token"),
            cluster: ClusterSection {
                node_id: member.id,
                peer_listen,
                certs_dir: install.join("certs"),
                members: &plan.members,
            },
        };
        let text = format!(
            "# Node {} of a cluster written by `understudy cluster init`; start it with\n\
             # `understudy node --config {}`. Other settings: see the README.\n{}",
            member.id,
            install.join(file_name(member.id)).display(),
            toml::to_string(&file).context("a node config as TOML")?
        );
        let path = out.join(file_name(member.id));
        write_private(&path, &text)?;
        written.push(Written {
            id: member.id,
            config_installed: install.join(file_name(member.id)),
            host: member.peer_addr.ip().to_string(),
        });
    }
    Ok(written)
}

/// What to copy to each machine and what to run there.
pub fn instructions(plan: &Plan, written: &[Written]) -> String {
    let out = std::fs::canonicalize(&plan.out).unwrap_or_else(|_| plan.out.clone());
    let install = plan.install_dir.clone().unwrap_or_else(|| out.clone());
    let mut text = String::new();
    let _ = writeln!(
        text,
        "wrote the cluster CA, {} node certificates, an admin token and {} node configs to {}",
        written.len(),
        written.len(),
        out.display()
    );
    if install != out {
        let _ = writeln!(
            text,
            "copy to {} on each machine: certs/ca.pem, its own certs/node-N.pem and certs/node-N-key.pem, admin-token and node-N.toml (keep certs/ca-key.pem off the nodes)",
            install.display()
        );
    }
    for w in written {
        let _ = writeln!(
            text,
            "on {} (node {}): understudy node --config {}",
            w.host,
            w.id,
            w.config_installed.display()
        );
    }
    let first = plan.members.first().map(|m| m.http_addr.clone());
    if let Some(http) = first {
        let _ = writeln!(
            text,
            "then: understudy status --node http://{http}   (deploy with --token \"$(cat {})\"; the console is http://{http}/ui)",
            install.join("admin-token").display()
        );
    }
    text
}

fn file_name(id: u64) -> String {
    format!("node-{id}.toml")
}

/// A new admin token: `TOKEN_BYTES` random bytes, hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for an admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write `text` to `path`, readable by its owner only (it may hold a secret).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy::config::Config;

    fn plan(out: &Path, listen_any: bool) -> Plan {
        Plan {
            out: out.to_owned(),
            install_dir: Some("/etc/understudy".into()),
            data_dir: None,
            listen_any,
            members: crate::cluster_flags::parse_peers(
                "1@10.0.0.1:7301,2@10.0.0.2:7301,3@10.0.0.3:7301",
                7201,
            )
            .expect("peers"),
            force: false,
        }
    }

    #[test]
    fn each_config_is_one_a_node_accepts_naming_the_installed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write(&plan(dir.path(), false)).expect("writes");
        assert_eq!(written.len(), 3);
        for w in &written {
            let path = dir.path().join(file_name(w.id));
            let mut cfg = Config::from_file(&path).expect("a config");
            let cluster = cfg.cluster.clone().expect("a cluster section");
            assert_eq!(cluster.node_id, w.id);
            assert_eq!(cluster.members.len(), 3);
            assert_eq!(cluster.certs_dir, PathBuf::from("/etc/understudy/certs"));
            assert_eq!(
                cfg.data_dir,
                PathBuf::from(format!("/etc/understudy/data-{}", w.id))
            );
            assert_eq!(cfg.listen.to_string(), format!("10.0.0.{}:7201", w.id));
            // The token file names the installed place; read the written one instead.
            cfg.admin_token_file = Some(dir.path().join("admin-token"));
            cfg.read_token_files().expect("the token file");
            assert_eq!(cfg.admin_token.as_deref().map(str::len), Some(64));
            cfg.validate().expect("a valid config");
            assert!(
                understudy_net::certs::node_cert_path(&dir.path().join("certs"), w.id).exists()
            );
        }
    }

    #[test]
    fn listen_any_binds_every_interface_on_the_members_ports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write(&plan(dir.path(), true)).expect("writes");
        let cfg = Config::from_file(&dir.path().join(file_name(written[1].id))).expect("a config");
        assert_eq!(cfg.listen.to_string(), "0.0.0.0:7201");
        let cluster = cfg.cluster.expect("a cluster section");
        assert_eq!(cluster.peer_listen.to_string(), "0.0.0.0:7301");
        assert_eq!(cluster.members[1].http_addr, "10.0.0.2:7201");
    }

    #[test]
    fn an_existing_ca_is_kept_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&plan(dir.path(), false)).expect("writes");
        let again = write(&plan(dir.path(), false)).expect_err("a CA is there");
        assert!(again.to_string().contains("exist"), "{again:#}");
        let mut forced = plan(dir.path(), false);
        forced.force = true;
        write(&forced).expect("replaces");
    }

    #[test]
    fn relative_install_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = plan(dir.path(), false);
        p.install_dir = Some("etc/understudy".into());
        let e = write(&p).expect_err("relative");
        assert!(e.to_string().contains("absolute"), "{e:#}");
    }
}
