//! Protocol detection on a redirected connection, for service ports that do not declare one:
//! look at the client's first bytes without consuming them.

use std::time::Duration;

use tokio::{net::TcpStream, time::timeout};

use super::http::H2_PREFACE;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Other,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Peeks until the bytes decide or `wait` passes (a server-first protocol sends nothing).
pub async fn detect(stream: &TcpStream, wait: Duration) -> Detected {
    let mut buf = [0u8; 24];
    let peek = async {
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Other,
                Ok(n) => n,
            };
            if let Some(detected) = classify(&buf[..n]) {
                return detected;
            }
            // Not enough bytes yet to decide: wait for more.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    timeout(wait, peek).await.unwrap_or(Detected::Other)
}

/// `None` while the prefix could still become either protocol.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| bytes.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let undecided = H2_PREFACE.starts_with(bytes) || METHODS.iter().any(|m| m.starts_with(bytes));
    (!undecided).then_some(Detected::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Other));
        assert_eq!(classify(b"hello"), Some(Detected::Other));
    }
}
