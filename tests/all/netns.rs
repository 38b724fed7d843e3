//! Test hosts in network namespaces: each host is a namespace of its own with one
//! interface, `eth0`, whose other end is a port of a bridge in the test's own namespace.
//! The test process reaches every host through the bridge (it is the client), and rules
//! inside a host's namespace (iptables `INPUT` DROP, the link set down) cut the host off
//! from its peers, or from everyone, as a real network fault would. Dropping a `Net`
//! deletes the namespaces (with their interfaces and rules) and the bridge, also when
//! the test failed.
//!
//! Needs root and iproute2 (CI has both); [`Net::new`] says `None` otherwise.

use std::net::Ipv4Addr;
use std::process::{Command, Output};

/// Bridges are numbered; the first free number gives the bridge's name and its subnet
/// (10.201.N.0/24), so that tests in parallel get networks of their own.
const BRIDGES: std::ops::RangeInclusive<u8> = 1..=250;

pub struct Net {
    number: u8,
    bridge: String,
    hosts: Vec<String>,
    /// The rule that lets the bridge forward even where the FORWARD policy is DROP (as
    /// Docker sets it).
    forward_rule: Option<Vec<String>>,
}

impl Net {
    /// A bridge and `hosts` namespaces on it. `None` when this machine cannot make them
    /// (not root, or no iproute2).
    pub fn new(hosts: usize) -> Option<Net> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root
            || !Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return None;
        }
        let number = BRIDGES.clone().find(|n| {
            run_ok(
                "ip",
                &["link", "add", &format!("usbr{n}"), "type", "bridge"],
            )
        })?;
        let mut net = Net {
            number,
            bridge: format!("usbr{number}"),
            hosts: Vec::new(),
            forward_rule: None,
        };
        let gateway = format!("{}/24", net.gateway());
        run("ip", &["addr", "add", &gateway, "dev", &net.bridge]);
        run("ip", &["link", "set", &net.bridge, "up"]);
        let rule = ["FORWARD", "-i", &net.bridge, "-j", "ACCEPT"].map(str::to_owned);
        if run_ok(
            "iptables",
            &["-I", &rule[0], &rule[1], &rule[2], &rule[3], &rule[4]],
        ) {
            net.forward_rule = Some(rule.to_vec());
        }
        for i in 0..hosts {
            let ns = format!("us{number}h{i}");
            let port = format!("us{number}p{i}");
            // A port of this number left by an earlier run (a namespace's removal is
            // finished by the kernel later, with its interfaces) would clash: this
            // number's bridge was free, so it belongs to nobody now.
            let _ = Command::new("ip").args(["link", "del", &port]).output();
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run("ip", &["netns", "add", &ns]);
            net.hosts.push(ns.clone());
            run(
                "ip",
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            run("ip", &["link", "set", &port, "master", &net.bridge, "up"]);
            let addr = format!("{}/24", net.addr(i));
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(net)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Host `i`'s address on `eth0`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.number, 10 + i as u8)
    }

    /// The test process's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.number, 1)
    }

    /// A free address on the network (for a virtual address).
    pub fn spare(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.number, 100)
    }

    /// Run `program args` inside host `i`'s namespace.
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.ns(i), program])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// Host `i` drops every packet that comes from host `from` (one way: run it for
    /// both hosts to cut them apart). Undone by [`Net::heal`].
    pub fn drop_from(&self, i: usize, from: usize) {
        let out = self.exec(
            i,
            "iptables",
            &[
                "-I",
                "INPUT",
                "-s",
                &self.addr(from).to_string(),
                "-j",
                "DROP",
            ],
        );
        assert!(out.status.success(), "iptables in {}: {out:?}", self.ns(i));
    }

    /// Cut hosts `a` and `b` apart, both ways.
    pub fn cut(&self, a: usize, b: usize) {
        self.drop_from(a, b);
        self.drop_from(b, a);
    }

    /// Remove every rule host `i` has.
    pub fn heal(&self, i: usize) {
        let out = self.exec(i, "iptables", &["-F", "INPUT"]);
        assert!(
            out.status.success(),
            "iptables -F in {}: {out:?}",
            self.ns(i)
        );
    }

    /// Take host `i`'s interface down (a dead machine answers nothing, ARP included)
    /// or up again.
    pub fn set_link(&self, i: usize, up: bool) {
        run(
            "ip",
            &[
                "-n",
                self.ns(i),
                "link",
                "set",
                "eth0",
                if up { "up" } else { "down" },
            ],
        );
    }

    /// Host `i`'s MAC address.
    pub fn mac(&self, i: usize) -> String {
        let out = self.exec(i, "cat", &["/sys/class/net/eth0/address"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Whether host `i` has `addr` on `eth0`.
    pub fn has_addr(&self, i: usize, addr: Ipv4Addr) -> bool {
        let out = self.exec(i, "ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {addr}/"))
    }

    /// The MAC this (the test's) namespace has learnt for `addr`, if any.
    pub fn neighbour(&self, addr: Ipv4Addr) -> Option<String> {
        let out = Command::new("ip")
            .args(["neigh", "show", &addr.to_string(), "dev", &self.bridge])
            .output()
            .expect("run ip neigh");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut words = text.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (i, ns) in self.hosts.iter().enumerate() {
            // The port first: the namespace's own removal completes later, and its end
            // of the pair with it.
            let port = format!("us{}p{i}", self.number);
            let _ = Command::new("ip").args(["link", "del", &port]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        if let Some(rule) = &self.forward_rule {
            let _ = Command::new("iptables").arg("-D").args(rule).output();
        }
    }
}

fn run_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
