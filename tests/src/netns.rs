//! A host of the test's own: a network namespace joined to this one by a veth pair, with the
//! rate of what this side sends into it set by the kernel's token bucket filter (`tc … tbf`).
//!
//! The test process stays in its namespace; programs run inside the new one with
//! `ip netns exec` (see [`crate::browser::Browser::start_in_netns`]). Servers the inner host
//! should reach listen on [`Netns::outer_addr`]; traffic to that address from this side goes
//! over loopback and is not shaped. Dropping the `Netns` kills what still runs inside and
//! removes the namespace and both veth ends, also when the test failed (a panic unwinds
//! through the drop).
//!
//! Needs root and Debian's iproute2 (`ip`, `tc`); without them creating one fails, it does not
//! skip.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::BoxError;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    name: String,
    /// The veth end on this side, where `tc` shapes what goes in.
    outer_if: String,
    outer_addr: String,
    inner_addr: String,
}

fn run(args: &[&str]) -> Result<(), BoxError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("could not run {}: {e} (iproute2 is needed)", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

impl Netns {
    /// Creates the namespace, the veth pair (a /30 of 10.201.0.0/16 picked from the process id
    /// and a counter) and brings both ends and the inner loopback up. The link is unshaped
    /// until [`Netns::shape`].
    pub fn create() -> Result<Netns, BoxError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let k = (pid.wrapping_mul(8).wrapping_add(n)) % 16384;
        let (a, b) = (k / 64, (k % 64) * 4);
        // Interface names have at most 15 bytes.
        let tag = format!("{:x}", (pid << 4 | (n & 0xf)) & 0xff_ffff);
        let ns = Netns {
            name: format!("onair-{tag}"),
            outer_if: format!("oa{tag}o"),
            outer_addr: format!("10.201.{a}.{}", b + 1),
            inner_addr: format!("10.201.{a}.{}", b + 2),
        };
        // Whatever a crashed run of the same id left behind.
        ns.remove();
        let inner_if = format!("oa{tag}i");
        let made = (|| {
            run(&["ip", "netns", "add", &ns.name])?;
            run(&[
                "ip",
                "link",
                "add",
                &ns.outer_if,
                "type",
                "veth",
                "peer",
                "name",
                &inner_if,
            ])?;
            run(&["ip", "link", "set", &inner_if, "netns", &ns.name])?;
            run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/30", ns.outer_addr),
                "dev",
                &ns.outer_if,
            ])?;
            run(&["ip", "link", "set", &ns.outer_if, "up"])?;
            let exec = ["ip", "netns", "exec", ns.name.as_str()];
            let inner = |args: &[&str]| {
                let mut v = exec.to_vec();
                v.extend_from_slice(args);
                run(&v)
            };
            inner(&[
                "ip",
                "addr",
                "add",
                &format!("{}/30", ns.inner_addr),
                "dev",
                &inner_if,
            ])?;
            inner(&["ip", "link", "set", &inner_if, "up"])?;
            inner(&["ip", "link", "set", "lo", "up"])
        })();
        // On failure the drop removes what was made.
        made.map(|()| ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This side's address on the veth: what the inner host reaches us at.
    pub fn outer_addr(&self) -> &str {
        &self.outer_addr
    }

    /// The inner host's address.
    pub fn inner_addr(&self) -> &str {
        &self.inner_addr
    }

    /// Sets the rate of everything sent from this side into the namespace: a token bucket of
    /// `kbit` kbit/s with a 64 KB burst, queueing at most 50 ms before it drops. Applied again,
    /// it changes the rate in place.
    pub fn shape(&self, kbit: u32) -> Result<(), BoxError> {
        run(&[
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.outer_if,
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "64kb",
            "latency",
            "50ms",
        ])
    }

    fn remove(&self) {
        // Programs still inside would keep the namespace alive under no name.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // Deleting the namespace takes the pair with it; this is for a half-made one.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer_if])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}
