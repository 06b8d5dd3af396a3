//! The container's veth, made and configured with iproute2 (`ip`) and, inside the container's
//! network namespace, `nsenter --net=` (util-linux). Both are on every node that runs
//! containers; a plugin runs once per container, and shelling out keeps it free of an async
//! netlink stack for a handful of calls. `ip` takes a namespace's path where it takes a name.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::spec::{CniError, Code};

fn run(cmd: &mut Command) -> Result<String, CniError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(|e| CniError::new(Code::Io, format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        return Err(CniError::new(
            Code::Io,
            format!(
                "{shown} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, CniError> {
    run(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<String, CniError> {
    run(Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("ip")
        .args(args))
}

/// An interface's index and MAC address, from `ip -o link show` output.
fn index_and_mac(out: &str) -> Option<(u32, String)> {
    let index = out.split(':').next()?.trim().parse().ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "link/ether")?;
    Some((index, words.next()?.to_owned()))
}

/// A link as the result names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its index (in its namespace).
    pub index: u32,
    /// Its MAC address.
    pub mac: String,
}

fn show(netns: Option<&str>, name: &str) -> Result<Link, CniError> {
    let args = ["-o", "link", "show", "dev", name];
    let out = match netns {
        Some(ns) => ip_in(ns, &args)?,
        None => ip(&args)?,
    };
    let (index, mac) = index_and_mac(&out).ok_or_else(|| {
        CniError::new(
            Code::Io,
            format!("`ip link show {name}` gave no index or MAC address"),
        )
    })?;
    Ok(Link { index, mac })
}

/// Whether `name` exists in this (the node's) namespace.
pub fn exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes the veth: `host` here, down (nothing passes until the agent enforces on it), and
/// `ifname` in the container's namespace `netns`. Returns both links.
pub fn create(host: &str, ifname: &str, netns: &str) -> Result<(Link, Link), CniError> {
    if !std::path::Path::new(netns).exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("the container's network namespace {netns} does not exist"),
        ));
    }
    if exists(host) {
        // Left by an ADD that did not finish: start again.
        delete(host)?;
    }
    ip(&[
        "link", "add", host, "type", "veth", "peer", "name", ifname, "netns", netns,
    ])?;
    Ok((show(None, host)?, show(Some(netns), ifname)?))
}

/// Configures both sides once the agent enforces on `host`: the container's address (a /32),
/// a default route through the link-local `gateway` (the node side's address); the node side
/// up, with a route to the container whose source is the node's address.
pub fn configure(
    host: &str,
    ifname: &str,
    netns: &str,
    address: Ipv4Addr,
    gateway: Ipv4Addr,
    node_address: Option<Ipv4Addr>,
) -> Result<(), CniError> {
    let (addr, gw) = (format!("{address}/32"), gateway.to_string());
    ip_in(netns, &["link", "set", "lo", "up"])?;
    ip_in(netns, &["addr", "add", &addr, "dev", ifname])?;
    ip_in(netns, &["link", "set", ifname, "up"])?;
    ip_in(
        netns,
        &["route", "add", &gw, "dev", ifname, "scope", "link"],
    )?;
    ip_in(
        netns,
        &["route", "add", "default", "via", &gw, "dev", ifname],
    )?;
    ip(&["addr", "add", &format!("{gw}/32"), "dev", host])?;
    ip(&["link", "set", host, "up"])?;
    let mut route = vec!["route".to_owned(), "replace".into(), addr, "dev".into()];
    route.push(host.to_owned());
    if let Some(src) = node_address {
        route.extend(["src".into(), src.to_string()]);
    }
    let route: Vec<&str> = route.iter().map(String::as_str).collect();
    ip(&route)?;
    Ok(())
}

/// Removes the veth (both sides go); nothing to do if it is gone.
pub fn delete(host: &str) -> Result<(), CniError> {
    if !exists(host) {
        return Ok(());
    }
    ip(&["link", "del", "dev", host]).map(|_| ())
}

/// The IPv4 addresses of `ifname` in `netns`.
pub fn addresses(netns: &str, ifname: &str) -> Result<Vec<String>, CniError> {
    let out = ip_in(netns, &["-o", "-4", "addr", "show", "dev", ifname])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next().map(str::to_owned)
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn reads_index_and_mac() {
        let out = "5: mctest@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether 52:be:22:79:6a:22 brd ff:ff:ff:ff:ff:ff link-netns t1";
        assert_eq!(
            index_and_mac(out),
            Some((5, "52:be:22:79:6a:22".to_owned()))
        );
        assert_eq!(index_and_mac("garbage"), None);
    }
}
