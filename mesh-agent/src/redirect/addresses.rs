//! A network namespace's own IPv4 addresses, read with one `RTM_GETADDR` dump of IPv4 only.
//! Not `getifaddrs`: it dumps every link as well, and a node's namespace has one per pod, so
//! each enrollment would cost more the more pods the node has.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The IPv4 addresses of the calling thread's network namespace, loopback excepted, sorted.
pub fn own_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let socket = Socket::new(NETLINK_ROUTE)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(request)),
    );
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let mut addresses = Vec::new();
    // The kernel sizes each read of a dump to the reader's buffer (a page at least).
    let mut received = vec![0; 16 * 1024];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&received[offset..size])
                    .map_err(|error| {
                        io::Error::new(io::ErrorKind::InvalidData, error.to_string())
                    })?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => {
                    addresses.sort_unstable();
                    addresses.dedup();
                    return Ok(addresses);
                }
                NetlinkPayload::Error(error) => return Err(error.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    addresses.extend(local_address(&address).filter(|ip| !ip.is_loopback()));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The address of an interface: `IFA_LOCAL` (`IFA_ADDRESS` is the peer's on a point-to-point
/// link), else `IFA_ADDRESS`.
fn local_address(message: &AddressMessage) -> Option<Ipv4Addr> {
    let ipv4 = |want_local: bool| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Local(IpAddr::V4(ip)) if want_local => Some(*ip),
                AddressAttribute::Address(IpAddr::V4(ip)) if !want_local => Some(*ip),
                _ => None,
            })
    };
    ipv4(true).or_else(|| ipv4(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_namespaces_addresses_without_loopback() {
        let addresses = own_addresses().expect("an address dump");
        assert!(addresses.iter().all(|ip| !ip.is_loopback()));
        assert!(addresses.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn the_local_address_wins_over_a_peers() {
        let (local, peer) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut message = AddressMessage::default();
        message.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(peer)),
            AddressAttribute::Local(IpAddr::V4(local)),
        ];
        assert_eq!(local_address(&message), Some(local));
        message.attributes.pop();
        assert_eq!(local_address(&message), Some(peer));
    }
}
