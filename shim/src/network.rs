//! The pod's network, carried into the VM (Kata's `tcfilter` model, as
//! firecracker-containerd's `tc-redirect-tap`).
//!
//! The CNI plugin set up a network namespace for the sandbox (its path is in the OCI
//! spec) with one or more interfaces (a veth, usually). For each one the shim creates a
//! persistent tap in that namespace and joins the two with tc: an ingress qdisc on
//! each and a u32 match-all filter whose `mirred egress redirect` action sends what
//! arrives on one out of the other. The VMM is started inside the namespace and opens
//! the tap by name; the guest NIC gets the pod interface's MAC, and the agent gives it
//! the pod's name, MTU, addresses and routes ([`PodNetwork::guest`]).
//!
//! What the shim adds (the taps and the qdiscs with their filters) is recorded in the
//! state file ([`NetworkRecord`]) and removed at teardown, after a failed start, and by
//! `shim delete` after a killed shim ([`NetworkRecord::detach`]).
//!
//! Netlink goes through `rtnetlink` on a thread that entered the namespace
//! (`setns` is per thread) with a current-thread runtime of its own; the parsing of
//! what the kernel reports into [`PodInterface`]s and [`PodRoute`]s is pure and tested.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::agent::{GuestInterface, GuestNetwork, GuestRoute};
use crate::error::{Error, Result};

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;
/// `tc ... parent ffff:`: the ingress qdisc's handle.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// An interface the CNI made in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its index in the namespace.
    pub index: u32,
    /// Its name (the guest NIC gets it too).
    pub name: String,
    /// Its MAC (the guest NIC gets it).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its global addresses.
    pub addresses: Vec<IpNet>,
}

/// A route of the pod's main table, on one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// `None`: the default route.
    pub destination: Option<IpNet>,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    /// Preferred source.
    pub source: Option<IpAddr>,
    /// Priority.
    pub metric: u32,
}

/// The pod's network as the shim found it, and the taps it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The namespace's path (from the OCI spec).
    pub netns: PathBuf,
    /// Its interfaces; the one at position N gets the tap [`tap_name`]`(N)`.
    pub interfaces: Vec<PodInterface>,
    /// Its routes.
    pub routes: Vec<PodRoute>,
}

/// What the shim added to a pod namespace, for the state file: `shim delete` removes
/// it after a killed shim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The namespace.
    pub netns: PathBuf,
    /// Taps created there.
    pub taps: Vec<String>,
    /// Interfaces that got an ingress qdisc (and the filter under it).
    pub links: Vec<String>,
}

/// The path of the network namespace in an OCI spec's `linux.namespaces`, if it has
/// one with a path (a CNI pod); `None` for the host's network or a spec without one.
pub fn netns_path(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    use oci_spec::runtime::LinuxNamespaceType;
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

/// The tap of the interface at `position`.
pub fn tap_name(position: usize) -> String {
    format!("tap{position}_gpuvm")
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `path` is the shim's own network namespace (a host-network pod).
fn is_own_netns(path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(path).map_err(Error::io(format!(
        "reading the pod's network namespace {}",
        path.display()
    )))?;
    let ours = std::fs::metadata("/proc/self/ns/net")
        .map_err(Error::io("reading the shim's network namespace"))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// A netlink failure, with the kernel's errno where it sent one.
fn netlink(context: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| {
        let source = match &e {
            rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
            _ => std::io::Error::other(e),
        };
        Error::Io { context, source }
    }
}

/// Runs `work` with a netlink handle inside the network namespace at `netns`, on a
/// thread of its own (a namespace is entered per thread), and waits for it.
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let what = format!("the pod's network namespace {}", netns.display());
    let file = std::fs::File::open(netns).map_err(Error::io(format!("opening {what}")))?;
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io(format!("entering {what}"))(e.into()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(Error::io("starting a netlink runtime"))?;
        runtime.block_on(async move {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(Error::io("opening a netlink socket"))?;
            let connection = tokio::spawn(connection);
            let outcome = work(handle).await;
            connection.abort();
            outcome
        })
    });
    thread
        .join()
        .map_err(|_| Error::Hypervisor("the network namespace thread panicked".into()))?
}

/// What a link message says of the link.
#[derive(Debug, Default)]
struct LinkFacts {
    name: String,
    /// An Ethernet MAC, if it has one.
    mac: Option<[u8; 6]>,
    mtu: u32,
    /// A tun or tap device.
    tun: bool,
}

fn link_facts(link: &LinkMessage) -> LinkFacts {
    let mut facts = LinkFacts {
        mtu: 1500,
        ..LinkFacts::default()
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => facts.name.clone_from(n),
            LinkAttribute::Address(a) => facts.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => facts.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                facts.tun |= infos.contains(&LinkInfo::Kind(InfoKind::Tun));
            }
            _ => {}
        }
    }
    facts
}

/// The interfaces of a namespace worth a guest NIC (pure): not loopback, not a tap
/// (ours or anyone's), with an Ethernet MAC; with their global addresses.
pub fn pod_interfaces(links: &[LinkMessage], addresses: &[AddressMessage]) -> Vec<PodInterface> {
    let mut found = Vec::new();
    for link in links {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let LinkFacts {
            name,
            mac: Some(mac),
            mtu,
            tun: false,
        } = link_facts(link)
        else {
            continue;
        };
        let index = link.header.index;
        let addresses = addresses
            .iter()
            .filter(|a| a.header.index == index && a.header.scope == AddressScope::Universe)
            .filter_map(address_of)
            .collect();
        found.push(PodInterface {
            index,
            name,
            mac,
            mtu,
            addresses,
        });
    }
    found
}

/// The local address of an address message (`IFA_LOCAL`, else `IFA_ADDRESS`).
fn address_of(message: &AddressMessage) -> Option<IpNet> {
    let find = |local: bool| {
        message.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    let address = find(true).or_else(|| find(false))?;
    Some(IpNet {
        address,
        prefix: message.header.prefix_len,
    })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The routes the guest needs (pure): unicast routes of the main table on one of
/// `interfaces`, except those the kernel makes itself from an address (the guest's
/// kernel makes them again) and IPv6 link-local ones.
pub fn pod_routes(routes: &[RouteMessage], interfaces: &[PodInterface]) -> Vec<PodRoute> {
    let names: HashMap<u32, &str> = interfaces
        .iter()
        .map(|i| (i.index, i.name.as_str()))
        .collect();
    let mut found = Vec::new();
    for route in routes {
        let header = &route.header;
        if header.kind != RouteType::Unicast || header.protocol == RouteProtocol::Kernel {
            continue;
        }
        let (mut table, mut oif) = (u32::from(header.table), None);
        let (mut destination, mut gateway, mut source, mut metric) = (None, None, None, 0);
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Destination(d) => destination = route_ip(d),
                RouteAttribute::Gateway(g) => gateway = route_ip(g),
                RouteAttribute::PrefSource(s) => source = route_ip(s),
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        let Some(device) = oif.and_then(|i| names.get(&i)) else {
            continue;
        };
        let link_local = matches!(destination, Some(IpAddr::V6(ip)) if ip.is_unicast_link_local());
        if table != RT_TABLE_MAIN || link_local {
            continue;
        }
        found.push(PodRoute {
            destination: destination
                .filter(|_| header.destination_prefix_length > 0)
                .map(|address| IpNet {
                    address,
                    prefix: header.destination_prefix_length,
                }),
            gateway,
            device: (*device).to_owned(),
            source,
            metric,
        });
    }
    found
}

/// Reads the namespace's links, addresses and routes.
async fn read_namespace(
    handle: Handle,
) -> Result<(Vec<LinkMessage>, Vec<AddressMessage>, Vec<RouteMessage>)> {
    let links = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the pod's links".into()))?;
    let addresses = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the pod's addresses".into()))?;
    let mut routes: Vec<RouteMessage> = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let more: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing the pod's routes".into()))?;
        routes.extend(more);
    }
    Ok((links, addresses, routes))
}

impl PodNetwork {
    /// Reads the pod's network from the namespace at `netns`: `None` when it is the
    /// shim's own (a host-network pod keeps what it had: no NIC).
    pub fn scan(netns: &Path) -> Result<Option<PodNetwork>> {
        if is_own_netns(netns)? {
            return Ok(None);
        }
        // What teardown removes must be the shim's own: refuse a namespace that has a
        // tap or an ingress qdisc already (another tc user, or a leftover).
        let taken = taps_and_qdiscs(netns)?;
        if !taken.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the pod's network namespace {} already has {}; gpuvm carries the pod's \
                 interfaces into the VM with taps and ingress qdiscs of its own",
                netns.display(),
                taken.join(", ")
            )));
        }
        let (links, addresses, routes) = in_netns(netns, read_namespace)?;
        let interfaces = pod_interfaces(&links, &addresses);
        let routes = pod_routes(&routes, &interfaces);
        Ok(Some(PodNetwork {
            netns: netns.to_owned(),
            interfaces,
            routes,
        }))
    }

    /// What the state file records of it, before [`PodNetwork::attach`] starts.
    pub fn record(&self) -> NetworkRecord {
        NetworkRecord {
            netns: self.netns.clone(),
            taps: (0..self.interfaces.len()).map(tap_name).collect(),
            links: self.interfaces.iter().map(|i| i.name.clone()).collect(),
        }
    }

    /// The VMM's NICs: each interface's tap with the interface's MAC.
    pub fn nics(&self) -> Vec<crate::hypervisor::Nic> {
        self.interfaces
            .iter()
            .enumerate()
            .map(|(i, interface)| crate::hypervisor::Nic {
                tap: tap_name(i),
                mac: format_mac(&interface.mac),
            })
            .collect()
    }

    /// What the guest agent configures (pure).
    pub fn guest(&self, hostname: &str) -> GuestNetwork {
        GuestNetwork {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| GuestInterface {
                    mac: format_mac(&i.mac),
                    name: i.name.clone(),
                    mtu: i.mtu,
                    addresses: i.addresses.iter().map(|a| (a.address, a.prefix)).collect(),
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| GuestRoute {
                    destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    metric: r.metric,
                })
                .collect(),
            hostname: hostname.to_owned(),
        }
    }

    /// Creates a tap per interface and the tc redirects between them. A failure part
    /// way leaves what was made for [`NetworkRecord::detach`].
    pub fn attach(&self) -> Result<()> {
        let pairs: Vec<(String, u32, u32)> = self
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, interface)| (tap_name(i), interface.index, interface.mtu))
            .collect();
        in_netns(&self.netns, move |handle| async move {
            for (tap, index, mtu) in pairs {
                create_tap(&tap)?;
                let tap_index = link_index(&handle, &tap)
                    .await?
                    .ok_or_else(|| Error::Hypervisor(format!("the tap {tap} vanished")))?;
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
                    .execute()
                    .await
                    .map_err(netlink(format!("setting {tap} up")))?;
                redirect(&handle, index, tap_index).await?;
                redirect(&handle, tap_index, index).await?;
            }
            Ok(())
        })
    }
}

/// Creates the persistent tap `name` in the calling thread's network namespace.
fn create_tap(name: &str) -> Result<()> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(Error::io("opening /dev/net/tun"))?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is; the fd is open.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(Error::io(format!("creating the tap {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is an attached tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(Error::io(format!("making the tap {name} persistent"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The index of link `name`, `None` when there is none.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let found: std::result::Result<Vec<LinkMessage>, _> = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect()
        .await;
    match found {
        Ok(links) => Ok(links.first().map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(netlink(format!("looking up {name}"))(e)),
    }
}

/// `tc qdisc add dev <from> ingress` + `tc filter add dev <from> parent ffff: protocol
/// all u32 match u8 0 0 action mirred egress redirect dev <to>`.
async fn redirect(handle: &Handle, from: u32, to: u32) -> Result<()> {
    let from_i32 = i32::try_from(from)
        .map_err(|_| Error::Hypervisor(format!("link index {from} out of range")))?;
    handle
        .qdisc()
        .add(from_i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!("adding an ingress qdisc to link {from}")))?;
    let request = handle
        .traffic_filter(from_i32)
        .add()
        .parent(INGRESS_PARENT)
        // tc carries the protocol in network byte order (`protocol all`).
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)
        .map_err(netlink(format!("building the redirect of link {from}")))?;
    request
        .execute()
        .await
        .map_err(netlink(format!("redirecting link {from} to link {to}")))
}

/// Removes the ingress qdisc of link `index` (and the filters under it); a link
/// without one is fine.
async fn remove_ingress(handle: &Handle, index: u32, name: &str) -> Result<()> {
    let Ok(index) = i32::try_from(index) else {
        return Ok(());
    };
    let mut request = handle.qdisc().del(index);
    let message: &mut TcMessage = request.message_mut();
    message.header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    message.header.handle = rtnetlink::packet_route::tc::TcHandle::from(INGRESS_PARENT);
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if [-libc::ENOENT, -libc::EINVAL].contains(&e.raw_code()) =>
        {
            Ok(())
        }
        Err(e) => Err(netlink(format!("removing the ingress qdisc of {name}"))(e)),
    }
}

impl NetworkRecord {
    /// Removes the taps and the ingress qdiscs the shim added. Best effort and
    /// idempotent: a namespace that is gone took everything with it.
    pub fn detach(&self) {
        if !self.netns.exists() {
            return;
        }
        let record = self.clone();
        let outcome = in_netns(&self.netns, move |handle| async move {
            let mut failures = Vec::new();
            for tap in &record.taps {
                if let Some(index) = link_index(&handle, tap).await?
                    && let Err(e) = handle.link().del(index).execute().await
                {
                    failures.push(netlink(format!("removing the tap {tap}"))(e));
                }
            }
            for link in &record.links {
                if let Some(index) = link_index(&handle, link).await?
                    && let Err(e) = remove_ingress(&handle, index, link).await
                {
                    failures.push(e);
                }
            }
            match failures.into_iter().next() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });
        match outcome {
            Ok(()) => {
                tracing::info!(netns = %self.netns.display(), taps = ?self.taps, "pod network detached")
            }
            Err(e) => {
                tracing::warn!(netns = %self.netns.display(), error = %e, "cannot detach the pod network")
            }
        }
    }
}

/// Taps and ingress qdiscs in the namespace at `netns`, as `tap <name>` / `ingress
/// qdisc on <name>` (the tests' leak check); empty when the namespace is gone.
pub fn taps_and_qdiscs(netns: &Path) -> Result<Vec<String>> {
    if !netns.exists() {
        return Ok(Vec::new());
    }
    in_netns(netns, |handle| async move {
        let (links, _, _) = read_namespace(handle.clone()).await?;
        let mut names = HashMap::new();
        let mut found = Vec::new();
        for link in &links {
            let facts = link_facts(link);
            if facts.tun {
                found.push(format!("tap {}", facts.name));
            }
            names.insert(link.header.index, facts.name);
        }
        let qdiscs: Vec<TcMessage> = handle
            .qdisc()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing qdiscs".into()))?;
        for qdisc in qdiscs {
            if qdisc
                .attributes
                .contains(&TcAttribute::Kind("ingress".into()))
            {
                let index = u32::try_from(qdisc.header.index).unwrap_or_default();
                let name = names.get(&index).cloned().unwrap_or_default();
                found.push(format!("ingress qdisc on {name}"));
            }
        }
        Ok(found)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::route::RouteScope;

    fn link(index: u32, name: &str, mac: &[u8], kind: Option<InfoKind>) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(mac.to_vec()),
            LinkAttribute::Mtu(1450),
        ];
        if let Some(kind) = kind {
            message
                .attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        message
    }

    fn address(index: u32, ip: &str, prefix: u8, scope: AddressScope) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = prefix;
        message.header.scope = scope;
        let ip: IpAddr = ip.parse().expect("ip");
        message.attributes = vec![AddressAttribute::Address(ip), AddressAttribute::Local(ip)];
        message
    }

    fn route(
        destination: Option<(&str, u8)>,
        gateway: Option<&str>,
        oif: u32,
        protocol: RouteProtocol,
    ) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = RT_TABLE_MAIN as u8;
        message.header.kind = RouteType::Unicast;
        message.header.scope = RouteScope::Universe;
        message.header.protocol = protocol;
        message.attributes.push(RouteAttribute::Oif(oif));
        if let Some((ip, prefix)) = destination {
            message.header.destination_prefix_length = prefix;
            let ip: IpAddr = ip.parse().expect("ip");
            message
                .attributes
                .push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(ip) = gateway {
            let ip: IpAddr = ip.parse().expect("ip");
            message.attributes.push(RouteAttribute::Gateway(ip.into()));
        }
        message
    }

    fn veth_pod() -> (Vec<LinkMessage>, Vec<AddressMessage>) {
        let mut lo = link(1, "lo", &[0; 6], None);
        lo.header.flags = LinkFlags::Loopback | LinkFlags::Up;
        let links = vec![
            lo,
            link(
                2,
                "eth0",
                &[0x02, 0x42, 0x0a, 0x58, 0, 5],
                Some(InfoKind::Veth),
            ),
            link(3, "tap0_gpuvm", &[0x5a, 1, 2, 3, 4, 5], Some(InfoKind::Tun)),
        ];
        let addresses = vec![
            address(1, "127.0.0.1", 8, AddressScope::Host),
            address(2, "10.88.0.5", 16, AddressScope::Universe),
            address(2, "fe80::42:aff:fe58:5", 64, AddressScope::Link),
            address(2, "fd00::5", 64, AddressScope::Universe),
        ];
        (links, addresses)
    }

    #[test]
    fn the_cni_veth_is_the_pods_interface() {
        let (links, addresses) = veth_pod();
        let interfaces = pod_interfaces(&links, &addresses);
        assert_eq!(
            interfaces,
            vec![PodInterface {
                index: 2,
                name: "eth0".into(),
                mac: [0x02, 0x42, 0x0a, 0x58, 0, 5],
                mtu: 1450,
                addresses: vec![
                    IpNet {
                        address: "10.88.0.5".parse().expect("ip"),
                        prefix: 16
                    },
                    IpNet {
                        address: "fd00::5".parse().expect("ip"),
                        prefix: 64
                    },
                ],
            }]
        );
    }

    #[test]
    fn routes_keep_the_default_and_static_ones_on_pod_interfaces() {
        let (links, addresses) = veth_pod();
        let interfaces = pod_interfaces(&links, &addresses);
        let mut other_table = route(Some(("10.1.0.0", 16)), None, 2, RouteProtocol::Static);
        other_table.attributes.push(RouteAttribute::Table(100));
        let mut with_metric = route(Some(("10.96.0.0", 12)), None, 2, RouteProtocol::Boot);
        with_metric.attributes.push(RouteAttribute::Priority(50));
        let routes = vec![
            route(None, Some("10.88.0.1"), 2, RouteProtocol::Boot),
            route(Some(("10.88.0.0", 16)), None, 2, RouteProtocol::Kernel),
            route(
                Some(("10.2.0.0", 16)),
                Some("10.88.0.1"),
                3,
                RouteProtocol::Boot,
            ),
            other_table,
            with_metric,
        ];
        assert_eq!(
            pod_routes(&routes, &interfaces),
            vec![
                PodRoute {
                    destination: None,
                    gateway: Some("10.88.0.1".parse().expect("ip")),
                    device: "eth0".into(),
                    source: None,
                    metric: 0,
                },
                PodRoute {
                    destination: Some(IpNet {
                        address: "10.96.0.0".parse().expect("ip"),
                        prefix: 12
                    }),
                    gateway: None,
                    device: "eth0".into(),
                    source: None,
                    metric: 50,
                },
            ]
        );
    }

    #[test]
    fn the_guest_gets_names_macs_addresses_routes_and_the_hostname() {
        let (links, addresses) = veth_pod();
        let interfaces = pod_interfaces(&links, &addresses);
        let routes = pod_routes(
            &[route(None, Some("10.88.0.1"), 2, RouteProtocol::Boot)],
            &interfaces,
        );
        let network = PodNetwork {
            netns: "/var/run/netns/cni-1".into(),
            interfaces,
            routes,
        };
        let guest = network.guest("pod-a");
        assert_eq!(guest.hostname, "pod-a");
        assert_eq!(guest.interfaces[0].mac, "02:42:0a:58:00:05");
        assert_eq!(guest.interfaces[0].mtu, 1450);
        assert_eq!(
            guest.interfaces[0].addresses[0],
            ("10.88.0.5".parse().expect("ip"), 16)
        );
        assert_eq!(guest.routes[0].destination, "");
        assert_eq!(guest.routes[0].gateway, "10.88.0.1");
        assert_eq!(
            network.nics(),
            vec![crate::hypervisor::Nic {
                tap: "tap0_gpuvm".into(),
                mac: "02:42:0a:58:00:05".into()
            }]
        );
        assert_eq!(
            network.record(),
            NetworkRecord {
                netns: "/var/run/netns/cni-1".into(),
                taps: vec!["tap0_gpuvm".into()],
                links: vec!["eth0".into()],
            }
        );
    }

    #[test]
    fn the_netns_comes_from_the_spec_only_with_a_path() {
        let spec = |namespaces: serde_json::Value| -> oci_spec::runtime::Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.1.0",
                "linux": {"namespaces": namespaces}
            }))
            .expect("spec")
        };
        let cni = spec(
            serde_json::json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]),
        );
        assert_eq!(
            netns_path(&cni),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(
            netns_path(&spec(serde_json::json!([{"type": "network"}]))),
            None
        );
        assert_eq!(
            netns_path(&spec(serde_json::json!([{"type": "pid"}]))),
            None
        );
    }

    /// A network namespace of its own, held by a parked thread; its path.
    struct TestNetns {
        path: PathBuf,
        _release: std::sync::mpsc::Sender<()>,
    }

    /// A new netns with a veth pair `veth0`/`veth1` (both ends in it, up), or `None`
    /// (printed SKIPPED) without root.
    fn netns_with_veth() -> Option<TestNetns> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            gpuvm_testkit::skip(
                gpuvm_testkit::Requirement::Root,
                "network namespaces need root",
            );
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (path_tx, path_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let path = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
            path_tx.send(path).expect("send");
            let _ = rx.recv();
        });
        let path = path_rx.recv().expect("the netns path");
        in_netns(&path, |handle| async move {
            handle
                .link()
                .add(rtnetlink::LinkVeth::new("veth0", "veth1").up().build())
                .execute()
                .await
                .map_err(netlink("adding a veth".into()))?;
            let peer = link_index(&handle, "veth1").await?.expect("veth1");
            handle
                .link()
                .set(LinkUnspec::new_with_index(peer).up().build())
                .execute()
                .await
                .map_err(netlink("setting veth1 up".into()))
        })
        .expect("the veth pair");
        Some(TestNetns { path, _release: tx })
    }

    #[test]
    fn attach_redirects_each_interface_through_a_tap_and_detach_removes_it_all() {
        let Some(ns) = netns_with_veth() else { return };
        let network = PodNetwork::scan(&ns.path)
            .expect("scan")
            .expect("not the host's");
        let mut names: Vec<&str> = network.interfaces.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["veth0", "veth1"]);
        network.attach().expect("attach");
        let mut attached = taps_and_qdiscs(&ns.path).expect("inspect");
        attached.sort();
        let first = &network.interfaces[0].name;
        let second = &network.interfaces[1].name;
        let mut want = vec![
            format!("ingress qdisc on {first}"),
            format!("ingress qdisc on {second}"),
            "ingress qdisc on tap0_gpuvm".to_owned(),
            "ingress qdisc on tap1_gpuvm".to_owned(),
            "tap tap0_gpuvm".to_owned(),
            "tap tap1_gpuvm".to_owned(),
        ];
        want.sort();
        assert_eq!(attached, want);
        // A second sandbox in the same namespace is refused: the taps are taken.
        let err = PodNetwork::scan(&ns.path).expect_err("taken");
        assert!(err.to_string().contains("already has"), "{err}");
        network.record().detach();
        assert_eq!(
            taps_and_qdiscs(&ns.path).expect("inspect"),
            Vec::<String>::new()
        );
        network.record().detach();
    }

    #[test]
    fn the_shims_own_namespace_is_the_host_network() {
        assert!(is_own_netns(Path::new("/proc/self/ns/net")).expect("stat"));
        assert!(is_own_netns(Path::new("/nonexistent/netns")).is_err());
    }
}
