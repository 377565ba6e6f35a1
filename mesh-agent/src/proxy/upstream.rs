//! Upstream connections, made from the source pod's network namespace so the pod's own IP is
//! the source, and marked so the kernel programs never redirect them.

use std::{io, net::SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

use crate::redirect::netns::NetNs;

pub async fn connect(netns: &NetNs, mark: u32, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns.run(|| {
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        Ok(socket)
    })?;
    TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
}
