//! A host on its own network: a network namespace joined to the root one by
//! a veth pair, and the faults the kernel can put on that link: nftables
//! drops (a partition, random loss) and a tbf bandwidth cap.
//!
//! The root side of the link is `10.231.N.1/30`, the namespace side
//! `10.231.N.2/30` with its default route through the root side, so a
//! process in the namespace reaches every address of the root namespace
//! (the bus, the storage agent) through the link, and every fault on the
//! link hits it. The kernel here has no netem: the chaos suite adds
//! latency with a UDP relay instead.
//!
//! Used by the end-to-end tests (hosts on networks of their own) and by
//! the chaos suite (the faults).
//!
//! Needs root (`ip netns`, `nft`, `tc`). Dropping a [`Netns`] deletes the
//! namespace, and with it the link, its rules and its qdisc.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Links made by this process so far (the third octet and the names).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The nftables table every fault of a namespace lives in.
const TABLE: &str = "chaos";

/// A network namespace with a veth link to the root namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
    root_if: String,
    ns_if: String,
    octet: u32,
}

impl Netns {
    /// Makes a namespace and its link, addresses and routes, and an empty
    /// nftables table with an input and an output chain.
    pub fn create() -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are at most 15 bytes.
        let tag = format!("{:x}{n}", pid % 0xffff);
        let octet = (pid + n) % 250 + 1;
        let ns = Self {
            name: format!("flc-{tag}"),
            root_if: format!("flc{tag}r"),
            ns_if: format!("flc{tag}n"),
            octet,
        };
        // A namespace left behind by a killed run of the same pid: gone.
        let _ = quiet(&["ip", "netns", "del", &ns.name]);
        let _ = quiet(&["ip", "link", "del", &ns.root_if]);
        ns.setup()
            .with_context(|| format!("cannot set up network namespace {}", ns.name))?;
        Ok(ns)
    }

    fn setup(&self) -> Result<()> {
        let (root_ip, ns_ip) = (self.root_ip(), self.ns_ip());
        run(&["ip", "netns", "add", &self.name])?;
        run(&[
            "ip",
            "link",
            "add",
            &self.root_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ])?;
        run(&["ip", "link", "set", &self.ns_if, "netns", &self.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{root_ip}/30"),
            "dev",
            &self.root_if,
        ])?;
        run(&["ip", "link", "set", &self.root_if, "up"])?;
        self.exec(&["ip", "link", "set", "lo", "up"])?;
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &self.ns_if,
        ])?;
        self.exec(&["ip", "link", "set", &self.ns_if, "up"])?;
        self.exec(&["ip", "route", "add", "default", "via", &root_ip])?;
        self.nft(&format!(
            "table inet {TABLE} {{\n\
             chain input {{ type filter hook input priority 0; }}\n\
             chain output {{ type filter hook output priority 0; }}\n\
             }}\n"
        ))
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root side's address: what the namespace dials to reach the root
    /// namespace's services.
    pub fn root_ip(&self) -> String {
        format!("10.231.{}.1", self.octet)
    }

    /// The namespace side's address.
    pub fn ns_ip(&self) -> String {
        format!("10.231.{}.2", self.octet)
    }

    /// Runs `args` inside the namespace; fails with its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Feeds `script` to `nft -f -` inside the namespace.
    pub fn nft(&self, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (install the Debian package nftables)")?;
        child
            .stdin
            .take()
            .context("nft has no stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft refused:\n{script}\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Drops every UDP datagram between the namespace and `port` on the
    /// root side, both ways: the QUIC data plane is cut, the bus (TCP) is
    /// not. [`Netns::heal`] lifts it.
    pub fn partition_udp(&self, port: u16) -> Result<()> {
        let root = self.root_ip();
        self.nft(&format!(
            "add rule inet {TABLE} output ip daddr {root} udp dport {port} counter drop\n\
             add rule inet {TABLE} input ip saddr {root} udp sport {port} counter drop\n"
        ))
    }

    /// Drops `percent` % of the packets on the link, chosen at random,
    /// each way (TCP and UDP alike).
    pub fn loss(&self, percent: u32) -> Result<()> {
        let dev = &self.ns_if;
        self.nft(&format!(
            "add rule inet {TABLE} output oifname {dev} numgen random mod 100 < {percent} counter drop\n\
             add rule inet {TABLE} input iifname {dev} numgen random mod 100 < {percent} counter drop\n"
        ))
    }

    /// Packets the drop rules have dropped so far (their counters): proof
    /// that a partition or loss hit traffic.
    pub fn dropped(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "list", "table", "inet", TABLE,
            ])
            .output()
            .context("cannot run nft")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(numbers_after(&text, "packets "))
    }

    /// Packets the bandwidth cap held back so far (tbf's `overlimits`):
    /// proof that the cap throttled traffic.
    pub fn throttled(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "tc",
                "-s",
                "qdisc",
                "show",
                "dev",
                &self.ns_if,
            ])
            .output()
            .context("cannot run tc")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(numbers_after(&text, "overlimits "))
    }

    /// Lifts every drop rule.
    pub fn heal(&self) -> Result<()> {
        self.nft(&format!(
            "flush chain inet {TABLE} output\nflush chain inet {TABLE} input\n"
        ))
    }

    /// Caps what the namespace sends at `kbit` kbit/s (a token bucket
    /// filter on its side of the link, 32 KiB of burst).
    pub fn cap(&self, kbit: u64) -> Result<()> {
        self.exec(&[
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.ns_if,
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "32kb",
            "latency",
            "400ms",
        ])
    }

    /// Lifts the cap.
    pub fn uncap(&self) -> Result<()> {
        self.exec(&["tc", "qdisc", "del", "dev", &self.ns_if, "root"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = quiet(&["ip", "netns", "del", &self.name]);
        // Deleting the namespace deletes the pair, but not always at once.
        let _ = quiet(&["ip", "link", "del", &self.root_if]);
    }
}

/// Whether this process can make namespaces (root, and `ip` and `nft`
/// installed); why not otherwise.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces)".to_owned());
    }
    for tool in ["ip", "nft", "tc"] {
        if quiet(&[tool, "-V"]).is_err() && quiet(&[tool, "--version"]).is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet(args: &[&str]) -> Result<()> {
    let status = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("`{}` failed", args.join(" "));
    }
    Ok(())
}

/// The sum of the numbers that follow `label` in `text` (nft's `packets N`,
/// tc's `overlimits N`).
fn numbers_after(text: &str, label: &str) -> u64 {
    text.match_indices(label)
        .filter_map(|(i, _)| {
            text[i + label.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::numbers_after;

    #[test]
    fn counters_are_summed_from_nft_and_tc_output() {
        let nft = "chain output {\n udp dport 7443 counter packets 12 bytes 900 drop\n}\n\
                   chain input {\n udp sport 7443 counter packets 3 bytes 100 drop\n}";
        assert_eq!(numbers_after(nft, "packets "), 15);
        let tc = "qdisc tbf 8001: root rate 40Mbit burst 32Kb lat 400ms\n \
                  Sent 123 bytes 4 pkt (dropped 0, overlimits 57 requeues 0)";
        assert_eq!(numbers_after(tc, "overlimits "), 57);
        assert_eq!(numbers_after("nothing here", "packets "), 0);
    }
}
