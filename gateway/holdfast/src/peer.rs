//! A client's address in 20 bytes instead of `Option<SocketAddr>`'s 32: every connection
//! keeps one for the lifetime of the connection (it goes to workers in OPEN), so it counts
//! against the few hundred bytes an idle connection may cost.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A peer address as the gateway keeps it (flow info and scope id are not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Peer {
    /// Not known (yet): reported as 0.0.0.0:0.
    #[default]
    Unknown,
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

impl Peer {
    /// The address, if known.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Peer::Unknown => None,
            known => Some(known.get()),
        }
    }

    pub fn get(self) -> SocketAddr {
        match self {
            Peer::Unknown => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            Peer::V4(ip, port) => SocketAddr::V4(SocketAddrV4::new(ip.into(), port)),
            Peer::V6(ip, port) => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0)),
        }
    }
}

impl From<Option<SocketAddr>> for Peer {
    fn from(a: Option<SocketAddr>) -> Peer {
        match a {
            None => Peer::Unknown,
            Some(SocketAddr::V4(a)) => Peer::V4(a.ip().octets(), a.port()),
            Some(SocketAddr::V6(a)) => Peer::V6(a.ip().octets(), a.port()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn addresses_round_trip_in_twenty_bytes() {
        assert_eq!(std::mem::size_of::<Peer>(), 20);
        for a in ["127.0.0.7:4433", "[2001:db8::1]:443", "0.0.0.0:0"] {
            let a = a.parse().unwrap();
            assert_eq!(Peer::from(Some(a)).get(), a);
        }
        assert_eq!(Peer::from(None).get(), "0.0.0.0:0".parse().unwrap());
    }
}
