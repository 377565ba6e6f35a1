//! An underlay capture: every frame that crosses a [`SimNetwork`]'s underlay (its bridge's
//! ports, one veth per node), read with an `AF_PACKET` socket opened inside the underlay's
//! network namespace, as tcpdump would. Tests ask what crossed: whether any TCP payload holds a
//! byte string (a request's path or header value sent in plaintext), and how many payload bytes
//! went to a port (proof the capture saw the traffic it vouches for).
//!
//! Frames are seen once per port they cross (the sender's veth and the receiver's). The buffer
//! is bounded ([`MAX_PAYLOAD_BYTES`]): past it, segments are counted but not kept, and
//! [`Captured::contains`] refuses to answer (a needle might be in what was dropped).

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{netns, SimNetwork};

/// TCP payload bytes a capture keeps, all segments together.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;
/// How often the capture thread looks whether it was stopped.
const POLL: Duration = Duration::from_millis(50);
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// One TCP segment with a payload, as it crossed the underlay.
#[derive(Clone, Debug)]
pub struct Segment {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Captured {
    segments: Vec<Segment>,
    kept_bytes: usize,
    /// Segments not kept: the buffer was full.
    dropped: u64,
}

impl Captured {
    /// Whether any TCP payload that crossed contains `needle`; an error when segments were
    /// dropped (the answer "no" would not be sure).
    pub fn contains(&self, needle: &[u8]) -> Result<bool> {
        if self.dropped > 0 {
            bail!(
                "the capture dropped {} segments past its {MAX_PAYLOAD_BYTES}-byte buffer",
                self.dropped
            );
        }
        Ok(!needle.is_empty()
            && self
                .segments
                .iter()
                .any(|segment| segment.payload.windows(needle.len()).any(|w| w == needle)))
    }

    /// TCP payload bytes seen going to `port` (counted once per underlay port crossed).
    pub fn payload_bytes_to_port(&self, port: u16) -> usize {
        self.segments
            .iter()
            .filter(|segment| segment.destination.port() == port)
            .map(|segment| segment.payload.len())
            .sum()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn keep(&mut self, segment: Segment) {
        if self.kept_bytes + segment.payload.len() > MAX_PAYLOAD_BYTES {
            self.dropped += 1;
            return;
        }
        self.kept_bytes += segment.payload.len();
        self.segments.push(segment);
    }
}

/// A capture running on a thread inside the underlay's namespace until [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    captured: Arc<Mutex<Captured>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Capture {
    /// Starts capturing on every port of `network`'s underlay; returns once the socket is open,
    /// so nothing sent afterwards is missed.
    pub fn start(network: &SimNetwork) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let captured = Arc::new(Mutex::new(Captured::default()));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            let captured = Arc::clone(&captured);
            netns::spawn_thread_in(
                &netns::path(network.underlay_netns_name()),
                move || -> io::Result<()> {
                    let socket = match packet_socket() {
                        Ok(socket) => {
                            let _ = opened_tx.send(Ok(()));
                            socket
                        }
                        Err(error) => {
                            let _ = opened_tx.send(Err(error.to_string()));
                            return Err(error);
                        }
                    };
                    read_frames(&socket, &stop, &captured)
                },
            )?
        };
        match opened_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => bail!("opening the capture socket: {error}"),
            Err(_) => bail!("the capture thread died before opening its socket"),
        }
        Ok(Capture {
            stop,
            captured,
            thread: Some(thread),
        })
    }

    /// Stops capturing; returns what crossed.
    pub fn stop(mut self) -> Result<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(result) => result.context("capturing")?,
                Err(_) => bail!("the capture thread panicked"),
            }
        }
        Ok(std::mem::take(
            &mut *self.captured.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An `AF_PACKET` socket receiving every frame of every interface of the calling thread's
/// network namespace, with a receive timeout of [`POLL`].
fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: libc::suseconds_t::try_from(POLL.as_micros()).unwrap_or(50_000),
    };
    // SAFETY: `timeout` is a valid timeval that outlives the call, and its size is passed.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn read_frames(socket: &OwnedFd, stop: &AtomicBool, captured: &Mutex<Captured>) -> io::Result<()> {
    let mut frame = vec![0u8; 65_536 + 64];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `frame` is a writable buffer of the length passed.
        let read = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if read < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                _ => return Err(error),
            }
        }
        let length = usize::try_from(read).unwrap_or(0);
        if let Some(segment) = tcp_segment(&frame[..length]) {
            captured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keep(segment);
        }
    }
    Ok(())
}

/// The TCP segment with a payload in an Ethernet frame, if it holds one (IPv4 only: the
/// simulated networks have no IPv6 addresses).
fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETH_P_IP {
        return None;
    }
    let ip = frame.get(14..)?;
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if *ip.get(9)? != IPPROTO_TCP || header_len < 20 || total_len > ip.len() {
        return None;
    }
    let address = |at: usize| -> Option<Ipv4Addr> {
        let bytes: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(bytes))
    };
    let (source_ip, destination_ip) = (address(12)?, address(16)?);
    let tcp = ip.get(header_len..total_len)?;
    let port = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(data_offset..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Segment {
        source: SocketAddrV4::new(source_ip, port(0)?),
        destination: SocketAddrV4::new(destination_ip, port(2)?),
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame carrying `payload` from 10.77.1.2:40000 to 10.77.2.2:80.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let total = u16::try_from(20 + 20 + payload.len()).unwrap();
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_TCP, 0, 0]);
        ip.extend_from_slice(&[10, 77, 1, 2, 10, 77, 2, 2]);
        frame.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn a_tcp_payload_is_found_and_attributed_to_its_port() {
        let segment = tcp_segment(&frame(b"GET /needle HTTP/1.1")).expect("a segment");
        assert_eq!(segment.source, "10.77.1.2:40000".parse().unwrap());
        assert_eq!(segment.destination, "10.77.2.2:80".parse().unwrap());
        let mut captured = Captured::default();
        captured.keep(segment);
        assert!(captured.contains(b"/needle").unwrap());
        assert!(!captured.contains(b"/other").unwrap());
        assert_eq!(captured.payload_bytes_to_port(80), 20);
        assert_eq!(captured.payload_bytes_to_port(15008), 0);
    }

    #[test]
    fn frames_without_a_tcp_payload_are_skipped() {
        assert!(tcp_segment(&frame(b"")).is_none());
        let mut arp = frame(b"x");
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(tcp_segment(&arp).is_none());
        assert!(tcp_segment(&[0; 10]).is_none());
    }

    #[test]
    fn a_full_buffer_makes_contains_refuse_to_answer() {
        let mut captured = Captured {
            kept_bytes: MAX_PAYLOAD_BYTES,
            ..Captured::default()
        };
        captured.keep(tcp_segment(&frame(b"late")).unwrap());
        assert!(captured.contains(b"late").is_err());
    }
}
