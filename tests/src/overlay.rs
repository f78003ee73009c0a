//! What the overlay suites share: agents in a cluster, and waiting for what the cluster store
//! tells them (networks appearing, routes coming and going).

use std::time::Duration;

use crate::{
    agent::Agent,
    api::{BpfRouteEntry, Endpoint, Network},
    topology::{Host, UPLINK},
    wait::{wait_for, wait_until},
};

/// How long a change in the cluster store may take to reach an agent: within a second by
/// design, plus scheduling slack on a loaded two-core machine.
pub const FOLLOW: Duration = Duration::from_secs(5);

/// An agent on `host` in a cluster: `store` is the `--store` spec (with `--cluster-dir DIR` for
/// the embedded one), the host is named `h<index>`, its leases last `lease_ttl` seconds.
pub fn cluster_agent<'t>(host: &'t Host, store: &[&str], lease_ttl: u64) -> Agent<'t> {
    let name = format!("h{}", host.index());
    let ttl = lease_ttl.to_string();
    let mut args = vec![
        "--uplink",
        UPLINK,
        "--host-name",
        &name,
        "--lease-ttl",
        &ttl,
    ];
    args.extend_from_slice(store);
    host.start_agent_with(&args)
}

/// Overlay views of an agent.
pub trait OverlayExt {
    /// The network `name` as this agent has it, once it has it (an overlay network defined on
    /// another host reaches it through the store).
    fn wait_network(&self, name: &str) -> Network;
    /// `netctl bpf routes list`.
    fn routes(&self) -> Vec<BpfRouteEntry>;
    /// Waits until the agent routes `subnet` to a VTEP (or, with `present` false, no longer
    /// does).
    fn wait_route(&self, subnet: &str, present: bool);
}

impl OverlayExt for Agent<'_> {
    fn wait_network(&self, name: &str) -> Network {
        wait_for(
            3 * FOLLOW,
            format!("network {name} on {}", self.host().netns()),
            || {
                let networks: Vec<Network> = self.netctl_json(&["network", "ls"]);
                networks.into_iter().find(|n| n.name == name)
            },
        )
    }

    fn routes(&self) -> Vec<BpfRouteEntry> {
        self.netctl_json(&["bpf", "routes", "list"])
    }

    fn wait_route(&self, subnet: &str, present: bool) {
        wait_until(
            FOLLOW,
            format!(
                "{} {} a route to {subnet}",
                self.host().netns(),
                if present { "to have" } else { "to drop" }
            ),
            || {
                self.routes()
                    .iter()
                    .any(|r| r.subnet == subnet && r.vtep.is_some())
                    == present
            },
        );
    }
}

/// The overlay network `ov` on `pool`, made on `a1`'s host, with endpoint `e1` there and `e2` on
/// `a2`'s host, once each of the two hosts routes the other's subnet.
pub fn endpoint_on_each_host(a1: &Agent<'_>, a2: &Agent<'_>, pool: &str) -> (Endpoint, Endpoint) {
    let n1: Network =
        a1.netctl_json(&["network", "create", "ov", "-d", "overlay", "--subnet", pool]);
    let n2 = a2.wait_network("ov");
    let e1 = a1.endpoint_create("e1", "ov", &[]);
    let e2 = a2.endpoint_create("e2", "ov", &[]);
    a1.wait_route(&n2.subnet, true);
    a2.wait_route(&n1.subnet, true);
    (e1, e2)
}
