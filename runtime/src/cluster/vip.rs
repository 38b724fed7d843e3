//! The cluster's virtual address, kept as keepalived keeps one: the master holds it on
//! an interface (`--vip ADDR/PREFIX --vip-dev IFACE`), and when another node becomes
//! master it adds the address to its own interface and announces it with gratuitous ARP,
//! so that clients and routers on the segment send its packets to the new master's MAC
//! at once instead of after their ARP entries expire. A client that knows one address
//! keeps working through a failover of the master; the master forwards each invocation
//! to its function's primary.
//!
//! A node takes the address only while it is master and holds its master lease (see
//! `lease`), and lets it go as soon as another is master or its lease has lapsed for
//! 20 ms: a master cut off from its quorum drops the address about when another can be
//! elected (a moment of overlap misdirects nothing: every node forwards invocations, and
//! primaries answer under leases of their own). A node removes the
//! address when it starts (a crashed master leaves it on the interface) and when it
//! stops.
//!
//! The address is managed over rtnetlink; the ARP announcements go out on a raw
//! `AF_PACKET` socket. Both need `CAP_NET_ADMIN` and `CAP_NET_RAW`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Weak;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;

use super::Cluster;

/// How often the holder re-checks that it is still master.
const CHECK_EVERY: Duration = Duration::from_millis(2);
/// How long the holder keeps the address through a lapse of its master lease.
const LEASE_LAPSE_TOLERATED: Duration = Duration::from_millis(20);
/// Gratuitous ARPs sent on taking the address: at once, then again after each of these
/// delays (a switch or host that missed the first burst learns from a later one).
const ANNOUNCE_AGAIN: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("virtual address {0:?}: expected IPV4/PREFIX, such as 10.0.0.100/24")]
    Parse(String),
    #[error("virtual address: interface {0:?} not found")]
    NoDevice(String),
    #[error("virtual address: interface {0:?} has no Ethernet address (gratuitous ARP needs one)")]
    NoMac(String),
    #[error("virtual address: netlink: {0} (managing addresses needs CAP_NET_ADMIN)")]
    Netlink(String),
    #[error("virtual address: gratuitous ARP on {dev}: {error} (needs CAP_NET_RAW)")]
    Arp { dev: String, error: std::io::Error },
}

/// `ADDR/PREFIX` on interface `dev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub dev: String,
}

impl Vip {
    pub fn parse(cidr: &str, dev: &str) -> Result<Vip, Error> {
        let bad = || Error::Parse(cidr.to_owned());
        let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix == 0 || prefix > 32 || addr.is_unspecified() || addr.is_broadcast() {
            return Err(bad());
        }
        if dev.is_empty() {
            return Err(Error::NoDevice(dev.to_owned()));
        }
        Ok(Vip {
            addr,
            prefix,
            dev: dev.to_owned(),
        })
    }
}

impl std::fmt::Display for Vip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.addr, self.prefix, self.dev)
    }
}

/// The interface the address goes on, found once at start.
pub struct Link {
    pub vip: Vip,
    netlink: rtnetlink::Handle,
    index: u32,
    mac: [u8; 6],
}

impl Link {
    /// Find the interface and check that this process may manage addresses on it (by
    /// removing the address if a crashed run left it there). Call on the runtime that
    /// will run [`run`]: the netlink connection is spawned on it.
    pub async fn open(vip: Vip) -> Result<Link, Error> {
        let (connection, netlink, _) =
            rtnetlink::new_connection().map_err(|e| Error::Netlink(e.to_string()))?;
        tokio::spawn(connection);
        let mut links = netlink.link().get().match_name(vip.dev.clone()).execute();
        let message = match links.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => {
                return Err(Error::NoDevice(vip.dev.clone()))
            }
            Err(e) => return Err(Error::Netlink(e.to_string())),
        };
        let mac = message
            .attributes
            .iter()
            .find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::Address(mac) => {
                    <[u8; 6]>::try_from(mac.as_slice()).ok()
                }
                _ => None,
            })
            .ok_or_else(|| Error::NoMac(vip.dev.clone()))?;
        let link = Link {
            index: message.header.index,
            vip,
            netlink,
            mac,
        };
        if link.remove().await? {
            tracing::warn!(vip = %link.vip, "removed the virtual address left by an earlier run");
        }
        Ok(link)
    }

    async fn add(&self) -> Result<(), Error> {
        match self
            .netlink
            .address()
            .add(self.index, IpAddr::V4(self.vip.addr), self.vip.prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            // Already there (added by hand, or by this node a moment ago): fine.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(Error::Netlink(e.to_string())),
        }
    }

    /// Remove the address; whether it was there.
    pub async fn remove(&self) -> Result<bool, Error> {
        let found: Vec<_> = self
            .netlink
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(IpAddr::V4(self.vip.addr))
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::Netlink(e.to_string()))?;
        let removed = !found.is_empty();
        for message in found {
            match self.netlink.address().del(message).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
                Err(e) => return Err(Error::Netlink(e.to_string())),
            }
        }
        Ok(removed)
    }

    /// Broadcast gratuitous ARP for the address from this interface's MAC: once as a
    /// request and once as a reply (hosts differ in which one updates their caches).
    fn announce(&self) -> Result<(), Error> {
        let arp_error = |error| Error::Arp {
            dev: self.vip.dev.clone(),
            error,
        };
        let socket = PacketSocket::open().map_err(arp_error)?;
        for op in [ARP_REQUEST, ARP_REPLY] {
            socket
                .send(self.index, &gratuitous_arp(self.mac, self.vip.addr, op))
                .map_err(arp_error)?;
        }
        Ok(())
    }
}

const ETH_P_ARP: u16 = 0x0806;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const BROADCAST: [u8; 6] = [0xff; 6];

/// An Ethernet frame carrying an ARP packet in which `mac` claims `addr`, sent to
/// everyone on the segment (RFC 5227 section 3, "ARP Announcement").
fn gratuitous_arp(mac: [u8; 6], addr: Ipv4Addr, op: u16) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Hardware: Ethernet (1), 6 bytes; protocol: IPv4 (0x0800), 4 bytes.
    frame[14..16].copy_from_slice(&1u16.to_be_bytes());
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&op.to_be_bytes());
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&addr.octets());
    // Target: the same address; the target MAC is ignored in a request, broadcast in a
    // reply.
    if op == ARP_REPLY {
        frame[32..38].copy_from_slice(&BROADCAST);
    }
    frame[38..42].copy_from_slice(&addr.octets());
    frame
}

/// A raw `AF_PACKET` socket for ARP frames.
struct PacketSocket(std::os::fd::OwnedFd);

// Unavoidable: neither std nor the well-kept socket crates offer a safe way to address
// a frame to an interface (`sockaddr_ll`).
#[allow(unsafe_code)]
impl PacketSocket {
    fn open() -> std::io::Result<PacketSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the descriptor it returns (checked
        // below) is owned by the `OwnedFd` alone.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(PacketSocket(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd)
        }))
    }

    fn send(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value of it.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: `frame` and `to` are valid for the lengths passed, for the whole call.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Hold the address while this node is master with its lease; announce it on taking it;
/// drop it when not master. Runs on the links runtime, beside the lease task.
pub async fn run(cluster: Weak<Cluster>, link: std::sync::Arc<Link>) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    let mut announce_at: Vec<Instant> = Vec::new();
    let mut lease_lost_at: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let Some(c) = cluster.upgrade() else {
            let _ = link.remove().await;
            return;
        };
        let leader = c.control.leader() == Some(c.id);
        let lease = leader && c.lease_ok();
        if c.stopping.load(std::sync::atomic::Ordering::Acquire) {
            // `Cluster::shutdown` removes the address.
            return;
        }
        drop(c);
        // A lease that lapses for a moment (a stall of a millisecond or two) does not
        // move the address; one lost for longer, or another master, does. (Holding it a
        // little too long misdirects no data: every node forwards to the primaries, and
        // a primary answers only under its own lease.)
        let now = Instant::now();
        if lease {
            lease_lost_at = None;
        } else if leader {
            lease_lost_at.get_or_insert(now);
        }
        let master = lease
            || (held
                && leader
                && lease_lost_at.is_some_and(|t| now.duration_since(t) < LEASE_LAPSE_TOLERATED));
        if master && !held {
            if let Err(e) = link.add().await {
                tracing::error!(vip = %link.vip, error = %e, "cannot take the virtual address");
                continue;
            }
            held = true;
            tracing::info!(vip = %link.vip, "took the virtual address (this node is master)");
            announce_at = std::iter::once(now)
                .chain(ANNOUNCE_AGAIN.iter().map(|d| now + *d))
                .collect();
        } else if !master && held {
            held = false;
            announce_at.clear();
            release(&link).await;
        }
        if announce_at.first().is_some_and(|at| *at <= now) {
            announce_at.remove(0);
            if let Err(e) = link.announce() {
                tracing::warn!(vip = %link.vip, error = %e, "cannot announce the virtual address");
            }
        }
    }
}

async fn release(link: &Link) {
    match link.remove().await {
        Ok(_) => tracing::info!(vip = %link.vip, "gave up the virtual address (no longer master)"),
        Err(e) => {
            tracing::error!(vip = %link.vip, error = %e, "cannot give up the virtual address")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_address_with_its_prefix() {
        let vip = Vip::parse("10.1.2.3/24", "eth0").expect("a valid address");
        assert_eq!(vip.addr, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(vip.prefix, 24);
        assert_eq!(vip.to_string(), "10.1.2.3/24 on eth0");
        for bad in [
            "10.1.2.3",
            "10.1.2.3/33",
            "10.1.2.3/0",
            "::1/64",
            "0.0.0.0/8",
            "x/24",
        ] {
            assert!(
                matches!(Vip::parse(bad, "eth0"), Err(Error::Parse(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Vip::parse("10.1.2.3/24", ""),
            Err(Error::NoDevice(_))
        ));
    }

    #[test]
    fn a_gratuitous_arp_claims_the_address_for_the_mac() {
        let mac = [2, 0, 0, 0, 0, 7];
        let addr = Ipv4Addr::new(10, 0, 0, 100);
        let frame = gratuitous_arp(mac, addr, ARP_REQUEST);
        assert_eq!(&frame[0..6], &BROADCAST);
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[20..22], &[0, 1]);
        assert_eq!(&frame[22..28], &mac, "sender MAC");
        assert_eq!(&frame[28..32], &addr.octets(), "sender address");
        assert_eq!(&frame[38..42], &addr.octets(), "target address is the same");
        let reply = gratuitous_arp(mac, addr, ARP_REPLY);
        assert_eq!(&reply[20..22], &[0, 2]);
        assert_eq!(&reply[32..38], &BROADCAST);
    }
}
