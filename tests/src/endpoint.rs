//! Short ways to the interfaces of an [`Endpoint`], failing with the endpoint in the message.

use std::net::Ipv4Addr;

use crate::api::{Endpoint, Interface};

pub trait EndpointExt {
    /// The first interface (eth0, the default route); panics if the endpoint has none (modes
    /// `none`, `host`, `container:X`).
    fn eth0(&self) -> &Interface;
    /// The address of eth0.
    fn ip(&self) -> Ipv4Addr;
    /// The interface on `network`; panics if the endpoint is not on it.
    fn on(&self, network: &str) -> &Interface;
    /// The interface on `network`, if the endpoint is on it.
    fn find_on(&self, network: &str) -> Option<&Interface>;
    /// Names of the networks the endpoint is on, eth0's first.
    fn networks(&self) -> Vec<&str>;
}

impl EndpointExt for Endpoint {
    fn eth0(&self) -> &Interface {
        let eth0 = self
            .primary()
            .unwrap_or_else(|| panic!("endpoint {} has no interface: {self:#?}", self.name));
        assert_eq!(
            eth0.ifname, "eth0",
            "endpoint {}: the first interface should be eth0: {self:#?}",
            self.name
        );
        eth0
    }

    fn ip(&self) -> Ipv4Addr {
        self.eth0().ip
    }

    fn on(&self, network: &str) -> &Interface {
        self.find_on(network).unwrap_or_else(|| {
            panic!(
                "endpoint {} is not on network {network}: {self:#?}",
                self.name
            )
        })
    }

    fn find_on(&self, network: &str) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.network == network)
    }

    fn networks(&self) -> Vec<&str> {
        self.interfaces.iter().map(|i| i.network.as_str()).collect()
    }
}
