//! The pod network in the guest (`ConfigureNetwork`): each NIC the shim attached
//! (found by its MAC) gets the pod interface's name, MTU and addresses, then the pod's
//! routes are added and the hostname is set.
//!
//! [`validate`] turns the request into checked plain types (pure, table-tested); the
//! netlink part ([`apply`]) uses `rtnetlink` on a current-thread tokio runtime made for
//! the call (the agent's ttrpc server is synchronous).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use gpuvm_protocol::agent as pb;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{Error, Result};

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Longest hostname (`HOST_NAME_MAX`).
const MAX_HOSTNAME: usize = 64;
/// The MTU range an Ethernet-like link can have.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// A validated address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub address: IpAddr,
    /// Prefix length, within the family's width.
    pub prefix: u8,
}

/// One guest NIC to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The NIC's MAC, as the VMM gave it.
    pub mac: [u8; 6],
    /// The pod's name for it.
    pub name: String,
    /// `None` keeps the guest's MTU.
    pub mtu: Option<u32>,
    /// Addresses to add.
    pub addresses: Vec<Cidr>,
}

/// One route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None` is the default route.
    pub destination: Option<Cidr>,
    /// Next hop, of the route's family.
    pub gateway: Option<IpAddr>,
    /// One of the configured interfaces' names.
    pub device: String,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Route priority (0: none).
    pub metric: u32,
}

/// A validated `ConfigureNetworkRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// NICs, in request order.
    pub interfaces: Vec<Interface>,
    /// Routes, added in order.
    pub routes: Vec<Route>,
    /// `None` keeps the hostname.
    pub hostname: Option<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bad = || {
        Error::invalid(format!(
            "the MAC address {text:?} is not six hex bytes like 02:42:0a:58:00:05"
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 == 1 {
        return Err(Error::invalid(format!(
            "the MAC address {text} is a multicast address"
        )));
    }
    Ok(mac)
}

/// Checks an interface name as the kernel would (`dev_valid_name`).
fn check_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the interface name {name:?} is not valid (1 to {MAX_IFNAME} bytes, no '/', ':' or spaces)"
        )))
    }
}

/// Checks a hostname: RFC 1123 labels, at most 64 bytes.
fn check_hostname(name: &str) -> Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.len() <= MAX_HOSTNAME && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the hostname {name:?} is not a valid host name (RFC 1123 labels, at most {MAX_HOSTNAME} bytes)"
        )))
    }
}

/// Parses an address.
fn parse_ip(text: &str, what: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| Error::invalid(format!("the {what} {text:?} is not an IP address")))
}

/// An address with a prefix that fits its family.
fn cidr(address: IpAddr, prefix: u32, what: &str) -> Result<Cidr> {
    let width = if address.is_ipv4() { 32 } else { 128 };
    match u8::try_from(prefix) {
        Ok(p) if prefix <= width => Ok(Cidr { address, prefix: p }),
        _ => Err(Error::invalid(format!(
            "the {what} {address}/{prefix} has a prefix longer than {width}"
        ))),
    }
}

/// Parses `addr/prefix`.
fn parse_cidr(text: &str, what: &str) -> Result<Cidr> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| Error::invalid(format!("the {what} {text:?} is not <address>/<prefix>")))?;
    let prefix = prefix
        .parse()
        .map_err(|_| Error::invalid(format!("the {what} {text:?} has no numeric prefix")))?;
    cidr(parse_ip(address, what)?, prefix, what)
}

fn interface(req: &pb::NetworkInterface) -> Result<Interface> {
    check_ifname(&req.name)?;
    let mtu = match req.mtu {
        0 => None,
        mtu if MTU_RANGE.contains(&mtu) => Some(mtu),
        mtu => {
            return Err(Error::invalid(format!(
                "the MTU {mtu} of {} is outside {}..={}",
                req.name,
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }
    };
    let addresses = req
        .addresses
        .iter()
        .map(|a| cidr(parse_ip(&a.address, "address")?, a.prefix_len, "address"))
        .collect::<Result<_>>()?;
    Ok(Interface {
        mac: parse_mac(&req.mac)?,
        name: req.name.clone(),
        mtu,
        addresses,
    })
}

fn optional_ip(text: &str, what: &str) -> Result<Option<IpAddr>> {
    (!text.is_empty()).then(|| parse_ip(text, what)).transpose()
}

fn route(req: &pb::NetworkRoute, names: &[&str]) -> Result<Route> {
    if !names.contains(&req.device.as_str()) {
        return Err(Error::invalid(format!(
            "the route to {:?} names the device {:?}, which is not one of the interfaces {names:?}",
            req.destination, req.device
        )));
    }
    let destination = (!req.destination.is_empty())
        .then(|| parse_cidr(&req.destination, "route destination"))
        .transpose()?;
    let gateway = optional_ip(&req.gateway, "gateway")?;
    let source = optional_ip(&req.source, "route source")?;
    if destination.is_none() && gateway.is_none() {
        return Err(Error::invalid(format!(
            "the default route on {} has no gateway",
            req.device
        )));
    }
    let family = destination
        .map(|d| d.address.is_ipv4())
        .or(gateway.map(|g| g.is_ipv4()));
    for ip in [gateway, source].into_iter().flatten() {
        if Some(ip.is_ipv4()) != family {
            return Err(Error::invalid(format!(
                "the route to {:?} mixes IPv4 and IPv6 ({ip})",
                req.destination
            )));
        }
    }
    Ok(Route {
        destination,
        gateway,
        device: req.device.clone(),
        source,
        metric: req.metric,
    })
}

/// Checks every field of the request and returns it in plain types.
pub fn validate(req: &pb::ConfigureNetworkRequest) -> Result<NetworkConfig> {
    let interfaces: Vec<Interface> = req
        .interfaces
        .iter()
        .map(interface)
        .collect::<Result<_>>()?;
    for (i, a) in interfaces.iter().enumerate() {
        if interfaces[..i]
            .iter()
            .any(|b| b.name == a.name || b.mac == a.mac)
        {
            return Err(Error::invalid(format!(
                "two interfaces share the name {} or the MAC {}",
                a.name,
                format_mac(&a.mac)
            )));
        }
    }
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    let routes = req
        .routes
        .iter()
        .map(|r| route(r, &names))
        .collect::<Result<_>>()?;
    let hostname = (!req.hostname.is_empty()).then(|| req.hostname.clone());
    if let Some(name) = &hostname {
        check_hostname(name)?;
    }
    Ok(NetworkConfig {
        interfaces,
        routes,
        hostname,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A netlink failure as an [`Error::Io`] carrying the kernel's errno where it sent one.
fn netlink(context: String, e: rtnetlink::Error) -> Error {
    let source = match &e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        _ => std::io::Error::other(e),
    };
    Error::io(context, source)
}

/// Configures the guest's network and hostname as `config` says.
pub fn apply(config: &NetworkConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::io("Starting the netlink runtime", e))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("Opening a netlink socket", e))?;
        let connection = tokio::spawn(connection);
        let outcome = apply_links(&handle, config).await;
        connection.abort();
        outcome
    })?;
    if let Some(name) = &config.hostname {
        nix::unistd::sethostname(name)
            .map_err(|e| Error::io(format!("Setting the hostname to {name}"), e))?;
    }
    Ok(())
}

/// The guest's links (index, name, MAC).
async fn links(handle: &Handle) -> Result<Vec<(u32, String, Vec<u8>)>> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("Listing the guest's links".into(), e))?;
    Ok(messages
        .into_iter()
        .map(|m| {
            let mut name = String::new();
            let mut mac = Vec::new();
            for attr in m.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = n,
                    LinkAttribute::Address(a) => mac = a,
                    _ => {}
                }
            }
            (m.header.index, name, mac)
        })
        .collect())
}

async fn apply_links(handle: &Handle, config: &NetworkConfig) -> Result<()> {
    let present = links(handle).await?;
    let mut indexes = Vec::new();
    for nic in &config.interfaces {
        let Some((index, _, _)) = present.iter().find(|(_, _, mac)| mac[..] == nic.mac) else {
            return Err(Error::invalid(format!(
                "the guest has no NIC with the MAC {} (for {}); it has {:?}",
                format_mac(&nic.mac),
                nic.name,
                present
                    .iter()
                    .map(|(_, n, m)| format!("{n} {}", format_mac(m)))
                    .collect::<Vec<_>>()
            )));
        };
        indexes.push(*index);
    }
    // Free the pod's names first: a guest NIC may carry the name another one gets.
    for (i, index) in indexes.iter().enumerate() {
        set_link(
            handle,
            LinkUnspec::new_with_index(*index)
                .name(format!("gpuvmtmp{i}"))
                .build(),
            "Renaming a guest NIC",
        )
        .await?;
    }
    for (nic, index) in config.interfaces.iter().zip(&indexes) {
        let mut message = LinkUnspec::new_with_index(*index).name(nic.name.clone());
        if let Some(mtu) = nic.mtu {
            message = message.mtu(mtu);
        }
        set_link(
            handle,
            message.up().build(),
            &format!("Setting up {}", nic.name),
        )
        .await?;
        for a in &nic.addresses {
            handle
                .address()
                .add(*index, a.address, a.prefix)
                .execute()
                .await
                .map_err(|e| {
                    netlink(
                        format!("Adding {}/{} to {}", a.address, a.prefix, nic.name),
                        e,
                    )
                })?;
        }
    }
    for route in &config.routes {
        let index = config
            .interfaces
            .iter()
            .zip(&indexes)
            .find(|(nic, _)| nic.name == route.device)
            .map(|(_, index)| *index)
            .ok_or_else(|| Error::invalid(format!("no interface {}", route.device)))?;
        add_route(handle, route, index).await?;
    }
    Ok(())
}

async fn set_link(handle: &Handle, message: LinkMessage, what: &str) -> Result<()> {
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(|e| netlink(what.to_owned(), e))
}

/// The route message for `route` on link `index` (pure).
pub fn route_message(
    route: &Route,
    index: u32,
) -> std::result::Result<rtnetlink::packet_route::route::RouteMessage, String> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new();
    let destination = match (route.destination, route.gateway) {
        (Some(d), _) => d,
        (None, Some(IpAddr::V4(_))) => Cidr {
            address: IpAddr::from([0u8; 4]),
            prefix: 0,
        },
        (None, _) => Cidr {
            address: IpAddr::from([0u16; 8]),
            prefix: 0,
        },
    };
    builder = builder
        .destination_prefix(destination.address, destination.prefix)
        .map_err(|e| e.to_string())?;
    match route.gateway {
        Some(gateway) => builder = builder.gateway(gateway).map_err(|e| e.to_string())?,
        // A route without a next hop is on the link (what `ip route add … dev` does).
        None => builder = builder.scope(RouteScope::Link),
    }
    if let Some(source) = route.source {
        builder = builder.pref_source(source).map_err(|e| e.to_string())?;
    }
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    Ok(builder.output_interface(index).build())
}

async fn add_route(handle: &Handle, route: &Route, index: u32) -> Result<()> {
    let what = format!(
        "Adding the route to {} via {:?} on {}",
        route.destination.map_or("default".to_owned(), |d| format!(
            "{}/{}",
            d.address, d.prefix
        )),
        route.gateway,
        route.device
    );
    let message =
        route_message(route, index).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    handle
        .route()
        .add(message)
        .execute()
        .await
        .map_err(|e| netlink(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};

    fn nic(mac: &str, name: &str, mtu: u32, addresses: &[(&str, u32)]) -> pb::NetworkInterface {
        pb::NetworkInterface {
            mac: mac.into(),
            name: name.into(),
            mtu,
            addresses: addresses
                .iter()
                .map(|(a, p)| pb::IpAddress {
                    address: (*a).into(),
                    prefix_len: *p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn route(destination: &str, gateway: &str, device: &str) -> pb::NetworkRoute {
        pb::NetworkRoute {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
            ..Default::default()
        }
    }

    fn request(
        interfaces: Vec<pb::NetworkInterface>,
        routes: Vec<pb::NetworkRoute>,
        hostname: &str,
    ) -> pb::ConfigureNetworkRequest {
        pb::ConfigureNetworkRequest {
            interfaces,
            routes,
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cni_bridge_pod_validates() {
        let req = request(
            vec![nic(
                "02:42:0a:58:00:05",
                "eth0",
                1500,
                &[("10.88.0.5", 16), ("fd00::5", 64)],
            )],
            vec![
                route("", "10.88.0.1", "eth0"),
                route("10.96.0.0/12", "", "eth0"),
            ],
            "pod-1",
        );
        let config = validate(&req).expect("valid");
        assert_eq!(config.interfaces[0].mac, [0x02, 0x42, 0x0a, 0x58, 0, 5]);
        assert_eq!(config.interfaces[0].mtu, Some(1500));
        assert_eq!(
            config.interfaces[0].addresses[1],
            Cidr {
                address: "fd00::5".parse().expect("ip"),
                prefix: 64
            }
        );
        assert_eq!(config.routes[0].destination, None);
        assert_eq!(
            config.routes[0].gateway,
            Some("10.88.0.1".parse().expect("ip"))
        );
        assert_eq!(config.routes[1].destination.map(|d| d.prefix), Some(12));
        assert_eq!(config.hostname.as_deref(), Some("pod-1"));
        let empty = validate(&request(Vec::new(), Vec::new(), "")).expect("valid");
        assert_eq!(empty.hostname, None);
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let eth0 = || nic("02:42:0a:58:00:05", "eth0", 0, &[("10.88.0.5", 16)]);
        let cases: Vec<(pb::ConfigureNetworkRequest, &str)> = vec![
            (
                request(vec![nic("02:42:0a:58:00", "eth0", 0, &[])], vec![], ""),
                "MAC address",
            ),
            (
                request(vec![nic("zz:42:0a:58:00:05", "eth0", 0, &[])], vec![], ""),
                "MAC address",
            ),
            (
                request(vec![nic("01:00:5e:00:00:01", "eth0", 0, &[])], vec![], ""),
                "multicast",
            ),
            (
                request(vec![nic("02:42:0a:58:00:05", "a/b", 0, &[])], vec![], ""),
                "interface name",
            ),
            (
                request(
                    vec![nic("02:42:0a:58:00:05", "averyveryverylongname", 0, &[])],
                    vec![],
                    "",
                ),
                "interface name",
            ),
            (
                request(vec![nic("02:42:0a:58:00:05", "eth0", 9, &[])], vec![], ""),
                "MTU 9",
            ),
            (
                request(
                    vec![nic("02:42:0a:58:00:05", "eth0", 0, &[("10.88.0.5", 33)])],
                    vec![],
                    "",
                ),
                "prefix longer than 32",
            ),
            (
                request(
                    vec![nic("02:42:0a:58:00:05", "eth0", 0, &[("10.88.0", 8)])],
                    vec![],
                    "",
                ),
                "not an IP address",
            ),
            (
                request(
                    vec![eth0(), nic("02:42:0a:58:00:05", "eth1", 0, &[])],
                    vec![],
                    "",
                ),
                "share",
            ),
            (
                request(vec![eth0()], vec![route("", "10.88.0.1", "eth9")], ""),
                "not one of the interfaces",
            ),
            (
                request(vec![eth0()], vec![route("", "", "eth0")], ""),
                "no gateway",
            ),
            (
                request(vec![eth0()], vec![route("10.0.0.0", "", "eth0")], ""),
                "<address>/<prefix>",
            ),
            (
                request(
                    vec![eth0()],
                    vec![route("10.0.0.0/8", "fd00::1", "eth0")],
                    "",
                ),
                "mixes IPv4 and IPv6",
            ),
            (request(vec![eth0()], vec![], "bad_host"), "hostname"),
            (request(vec![eth0()], vec![], "-x"), "hostname"),
        ];
        for (req, want) in cases {
            let err = validate(&req).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn route_messages() {
        let default = Route {
            destination: None,
            gateway: Some("10.88.0.1".parse().expect("ip")),
            device: "eth0".into(),
            source: None,
            metric: 0,
        };
        let message = route_message(&default, 2).expect("message");
        assert_eq!(message.header.destination_prefix_length, 0);
        assert_eq!(message.header.scope, RouteScope::Universe);
        assert!(
            message
                .attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(
                    "10.88.0.1".parse().expect("ip")
                )))
        );
        assert!(message.attributes.contains(&RouteAttribute::Oif(2)));
        let on_link = Route {
            destination: Some(Cidr {
                address: "fd00::".parse().expect("ip"),
                prefix: 64,
            }),
            gateway: None,
            metric: 100,
            ..default
        };
        let message = route_message(&on_link, 3).expect("message");
        assert_eq!(message.header.scope, RouteScope::Link);
        assert_eq!(message.header.destination_prefix_length, 64);
        assert!(message.attributes.contains(&RouteAttribute::Priority(100)));
    }
}
