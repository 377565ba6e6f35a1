//! L4 forwarding: bytes both ways, untouched. The fallback for every non-HTTP connection.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::debug;

use super::{upstream, PodContext, Proxy};
use crate::telemetry::TcpRecord;

pub async fn forward(
    proxy: &Proxy,
    mut downstream: TcpStream,
    peer: SocketAddr,
    original: SocketAddrV4,
    pod: &PodContext,
) {
    let started = Instant::now();
    let _ = downstream.set_nodelay(true);
    let mut record = TcpRecord {
        source_pod: &pod.name,
        client_port: peer.port(),
        original_dst: original,
        sent_bytes: 0,
        received_bytes: 0,
        duration: started.elapsed(),
        error: None,
    };
    match upstream::connect(&pod.netns, proxy.agent_mark, original.into()).await {
        Ok(mut upstream) => {
            match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                Ok((sent, received)) => {
                    record.sent_bytes = sent;
                    record.received_bytes = received;
                }
                Err(error) => {
                    debug!(pod = %pod.name, %original, %error, "connection ended with an error");
                    record.error = Some(error.kind().to_string());
                }
            }
        }
        Err(error) => {
            debug!(pod = %pod.name, %original, %error, "upstream connect failed");
            record.error = Some(format!("connect: {error}"));
        }
    }
    record.duration = started.elapsed();
    proxy.access_log.tcp(&record);
}
