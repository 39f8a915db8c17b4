//! Network namespaces for the partition scenarios: a namespace with a veth pair to the
//! host, whose host end can be taken down (a partition) and up again (the heal).

use std::process::Command;

/// A network namespace with a veth pair to the host, removed when dropped.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// The namespace's own address on the veth.
    pub fn ns_ip(&self) -> String {
        let (net, _) = self.host_ip.rsplit_once('.').expect("an IPv4 address");
        format!("{net}.2")
    }

    pub fn create(tag: u8) -> Result<Netns, String> {
        let id = std::process::id() % 10_000;
        let name = format!("drvchaos{id}x{tag}");
        let (host_if, ns_if) = (format!("dvh{id}x{tag}"), format!("dvn{id}x{tag}"));
        let net = format!("10.{}.{}", 200 + tag, (id % 250) + 1);
        let ns = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: format!("{net}.1") };
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{net}.2/24"), "dev", &ns_if])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace a partition scenario needs: one that cannot be made fails the
    /// test (a scenario refused is not a scenario passed).
    pub fn required(tag: u8) -> Netns {
        Netns::create(tag).unwrap_or_else(|e| {
            panic!("the partition scenario needs network namespaces (root, iproute2); refusing is a failure: {e}")
        })
    }

    pub fn cut(&self) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    pub fn heal(&self) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
