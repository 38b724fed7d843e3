//! A cluster member started from flags (or their environment variables, as container
//! platforms expect) instead of a config file's `[cluster]` section:
//! `understudy node --id 1 --peers 1@10.0.0.1:7301,2@10.0.0.2:7301,3@10.0.0.3:7301
//! --certs certs`. This module only turns the flags into the same `cluster::Config` a
//! file would give; the runtime checks it as it checks a file's.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use understudy::cluster::{Config as ClusterConfig, Member};
use understudy::config::Config;

/// The cluster flags of `understudy node`; each overrides the config file's setting.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClusterFlags {
    /// This node's id in the cluster (its certificate's, see `cluster init`).
    #[arg(long = "id", env = "UNDERSTUDY_NODE_ID")]
    pub id: Option<u64>,
    /// The founding members, comma-separated: `ID@IP:PORT` (id and peer address), with
    /// `/HTTP_PORT` or `/IP:HTTP_PORT` for a member whose HTTP API is not on this node's
    /// port at the same IP. This node must be among them (unless it joins).
    #[arg(long, env = "UNDERSTUDY_PEERS")]
    pub peers: Option<String>,
    /// The directory `understudy cluster init` wrote (the CA and the node certificates).
    #[arg(long = "certs", env = "UNDERSTUDY_CERTS_DIR")]
    pub certs: Option<PathBuf>,
    /// The QUIC address to listen on for peers (default: this node's own address in
    /// --peers; `0.0.0.0:PORT` for every interface).
    #[arg(long, env = "UNDERSTUDY_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
}

impl ClusterFlags {
    fn any(&self) -> bool {
        self.id.is_some()
            || self.peers.is_some()
            || self.certs.is_some()
            || self.peer_listen.is_some()
    }
}

/// Apply `flags` to `cfg`'s `[cluster]` section, making one when the file had none.
/// `joining`: the node will join a running cluster (`--join`), so it needs no members.
///
/// Fails when a setting the section needs is given by neither, or `--peers` does not
/// parse.
pub fn apply(cfg: &mut Config, flags: ClusterFlags, joining: bool) -> anyhow::Result<()> {
    if !flags.any() {
        return Ok(());
    }
    let http_port = cfg.listen.port();
    let members = match &flags.peers {
        Some(list) => Some(parse_peers(list, http_port)?),
        None => None,
    };
    let existing = cfg.cluster.take();
    let node_id = match (flags.id, &existing) {
        (Some(id), _) => id,
        (None, Some(c)) => c.node_id,
        (None, None) => bail!("a cluster member needs --id (or UNDERSTUDY_NODE_ID)"),
    };
    let certs_dir = match (flags.certs, &existing) {
        (Some(dir), _) => dir,
        (None, Some(c)) => c.certs_dir.clone(),
        (None, None) => bail!("a cluster member needs --certs (or UNDERSTUDY_CERTS_DIR)"),
    };
    let members = match (members, &existing) {
        (Some(m), _) => m,
        (None, Some(c)) => c.members.clone(),
        (None, None) if joining => Vec::new(),
        (None, None) => {
            bail!("a cluster member needs --peers (or UNDERSTUDY_PEERS), or --join to join a running cluster")
        }
    };
    let own = members
        .iter()
        .find(|m| m.id == node_id)
        .map(|m| m.peer_addr);
    let peer_listen = match (flags.peer_listen, own, &existing) {
        (Some(addr), _, _) => addr,
        (None, Some(addr), _) => addr,
        (None, None, Some(c)) => c.peer_listen,
        (None, None, None) => bail!(
            "node {node_id} is not in --peers: give its peer address there, or --peer-listen when it joins"
        ),
    };
    let mut cluster = match existing {
        Some(c) => c,
        None => section(node_id, peer_listen, certs_dir.clone())?,
    };
    cluster.node_id = node_id;
    cluster.peer_listen = peer_listen;
    cluster.certs_dir = certs_dir;
    cluster.members = members;
    cfg.cluster = Some(cluster);
    Ok(())
}

/// A `[cluster]` section with these settings and every other one at its default.
fn section(
    node_id: u64,
    peer_listen: SocketAddr,
    certs_dir: PathBuf,
) -> anyhow::Result<ClusterConfig> {
    let value = serde_json::json!({
        "node_id": node_id,
        "peer_listen": peer_listen,
        "certs_dir": certs_dir,
        "members": [],
    });
    serde_json::from_value(value).context("a cluster section from flags")
}

/// Parse `--peers`: `ID@IP:PORT[/HTTP_PORT | /IP:HTTP_PORT]`, comma-separated. A member's
/// HTTP address defaults to its peer IP and `http_port` (this node's own HTTP port).
///
/// Fails on an entry that does not parse, or an id given twice.
pub fn parse_peers(list: &str, http_port: u16) -> anyhow::Result<Vec<Member>> {
    let mut members: Vec<Member> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || {
            format!("--peers: {entry:?} is not ID@IP:PORT, ID@IP:PORT/HTTP_PORT or ID@IP:PORT/IP:HTTP_PORT")
        };
        let (id, rest) = entry.split_once('@').with_context(bad)?;
        let id: u64 = id.parse().ok().with_context(bad)?;
        let (peer, http) = match rest.split_once('/') {
            Some((peer, http)) => (peer, Some(http)),
            None => (rest, None),
        };
        let peer_addr: SocketAddr = peer.parse().ok().with_context(bad)?;
        let http_addr = match http {
            None => SocketAddr::new(peer_addr.ip(), http_port),
            Some(h) => match h.parse::<u16>() {
                Ok(port) => SocketAddr::new(peer_addr.ip(), port),
                Err(_) => h.parse().ok().with_context(bad)?,
            },
        };
        if members.iter().any(|m| m.id == id) {
            bail!("--peers names node {id} twice");
        }
        members.push(Member {
            id,
            peer_addr,
            http_addr: http_addr.to_string(),
            role: "voter".into(),
        });
    }
    if members.is_empty() {
        bail!("--peers is empty");
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_take_this_nodes_http_port_unless_they_name_theirs() {
        let m = parse_peers(
            "1@10.0.0.1:7301, 2@10.0.0.2:7301/7070,3@10.0.0.3:7301/10.0.1.3:80",
            7201,
        )
        .expect("parses");
        let addrs: Vec<(u64, String, String)> = m
            .iter()
            .map(|m| (m.id, m.peer_addr.to_string(), m.http_addr.clone()))
            .collect();
        assert_eq!(
            addrs,
            vec![
                (1, "10.0.0.1:7301".into(), "10.0.0.1:7201".into()),
                (2, "10.0.0.2:7301".into(), "10.0.0.2:7070".into()),
                (3, "10.0.0.3:7301".into(), "10.0.1.3:80".into()),
            ]
        );
    }

    #[test]
    fn bad_peers_are_refused_saying_why() {
        for (list, says) in [
            ("1@10.0.0.1", "is not ID@IP:PORT"),
            ("x@10.0.0.1:7301", "is not ID@IP:PORT"),
            ("1@host.example:7301", "is not ID@IP:PORT"),
            ("1@10.0.0.1:7301/http", "is not ID@IP:PORT"),
            ("1@10.0.0.1:7301,1@10.0.0.2:7301", "twice"),
            (" , ", "empty"),
        ] {
            let e = parse_peers(list, 7201).expect_err(list).to_string();
            assert!(e.contains(says), "{list}: {e}");
        }
    }

    #[test]
    fn flags_make_a_cluster_section_without_a_file() {
        let mut cfg = Config::default();
        let flags = ClusterFlags {
            id: Some(2),
            peers: Some("1@127.0.0.1:7301/7201,2@127.0.0.1:7302/7202".into()),
            certs: Some("certs".into()),
            peer_listen: None,
        };
        apply(&mut cfg, flags, false).expect("applies");
        let c = cfg.cluster.expect("a cluster section");
        assert_eq!(c.node_id, 2);
        assert_eq!(c.peer_listen.to_string(), "127.0.0.1:7302");
        assert_eq!(c.members.len(), 2);
        assert_eq!(c.certs_dir, PathBuf::from("certs"));
        // The defaults a file would get.
        let file: ClusterConfig = toml::from_str(
            "node_id = 2\npeer_listen = \"127.0.0.1:7302\"\ncerts_dir = \"certs\"\nmembers = []",
        )
        .expect("a section");
        assert_eq!(
            (
                c.heartbeat_ms,
                c.failure_timeout_ms,
                c.route_wait_ms,
                c.role
            ),
            (
                file.heartbeat_ms,
                file.failure_timeout_ms,
                file.route_wait_ms,
                file.role
            )
        );
    }

    #[test]
    fn a_member_needs_its_id_certs_and_peers() {
        let peers = Some("1@127.0.0.1:7301".to_owned());
        for (flags, says) in [
            (
                ClusterFlags {
                    id: None,
                    peers: peers.clone(),
                    certs: Some("c".into()),
                    peer_listen: None,
                },
                "--id",
            ),
            (
                ClusterFlags {
                    id: Some(1),
                    peers: peers.clone(),
                    certs: None,
                    peer_listen: None,
                },
                "--certs",
            ),
            (
                ClusterFlags {
                    id: Some(1),
                    peers: None,
                    certs: Some("c".into()),
                    peer_listen: None,
                },
                "--peers",
            ),
            (
                ClusterFlags {
                    id: Some(2),
                    peers,
                    certs: Some("c".into()),
                    peer_listen: None,
                },
                "not in --peers",
            ),
        ] {
            let e = apply(&mut Config::default(), flags, false)
                .expect_err(says)
                .to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        // Joining, it needs no members, but an address to listen on.
        let joining = ClusterFlags {
            id: Some(4),
            peers: None,
            certs: Some("c".into()),
            peer_listen: Some("127.0.0.1:7304".parse().expect("addr")),
        };
        let mut cfg = Config::default();
        apply(&mut cfg, joining, true).expect("applies");
        assert!(cfg.cluster.expect("a section").members.is_empty());
    }

    #[test]
    fn no_cluster_flag_leaves_the_config_alone() {
        let mut cfg = Config::default();
        apply(&mut cfg, ClusterFlags::default(), false).expect("applies");
        assert!(cfg.cluster.is_none());
    }
}
