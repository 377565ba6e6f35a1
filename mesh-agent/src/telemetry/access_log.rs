//! One structured line per connection on stdout, when enabled.

use std::{
    io::Write,
    net::SocketAddrV4,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    enabled: bool,
}

/// A finished L4 connection.
#[derive(Debug, Serialize)]
pub struct TcpRecord<'a> {
    pub source_pod: &'a str,
    /// The client's local port inside its pod (the accepted socket's peer port).
    pub client_port: u16,
    pub original_dst: SocketAddrV4,
    /// Bytes from the client to the upstream.
    pub sent_bytes: u64,
    /// Bytes from the upstream to the client.
    pub received_bytes: u64,
    #[serde(serialize_with = "as_micros")]
    pub duration: Duration,
    pub error: Option<String>,
}

#[derive(Serialize)]
struct Line<'a, T> {
    time: f64,
    kind: &'static str,
    #[serde(flatten)]
    record: &'a T,
}

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

impl AccessLog {
    pub fn new(enabled: bool) -> Self {
        AccessLog { enabled }
    }

    pub fn tcp(&self, record: &TcpRecord<'_>) {
        self.write("tcp", record);
    }

    fn write<T: Serialize>(&self, kind: &'static str, record: &T) {
        if !self.enabled {
            return;
        }
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let Ok(mut line) = serde_json::to_vec(&Line { time, kind, record }) else {
            return;
        };
        line.push(b'\n');
        // One write per line keeps lines whole when tasks log concurrently.
        let _ = std::io::stdout().lock().write_all(&line);
    }
}
