//! Probing cluster members from outside, as the certificate tests do: whether a
//! member completes a mutual-TLS handshake with a given certificate, which
//! certificate a new connection to it is shown, and which TCP connections a member
//! process holds (so a test can tell an established link that stayed up from one that
//! was dropped and dialled again).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use prost::Message;
use tonic::Code;
use weft_proto::grpc::{self, relay_frame::Kind, RelayBatch, RelayFrame};
use weft_router::tls::{Expect, Transport};
use weft_router::RouterClient;

/// Whether the member at `addr` completes a handshake with `transport`: a node (its
/// id given) is asked for a relay link as a stranger (refused *after* the handshake,
/// `PERMISSION_DENIED`), a router for its state.
pub async fn handshake_ok(transport: &Transport, addr: &str, node: Option<&str>) -> bool {
    match node {
        Some(id) => {
            let ch = transport
                .channel(addr, Expect::Node(id.into()), Duration::from_secs(2))
                .expect("channel");
            let mut client = grpc::relay_client::RelayClient::new(ch);
            let frame = RelayFrame {
                kind: Some(Kind::Hello(grpc::Hello {
                    node: "prober".into(),
                    ring_version: 0,
                    ..Default::default()
                })),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(RelayBatch {
                frames: vec![frame.encode_to_vec().into()],
            })
            .await
            .expect("queue");
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                client.link(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .expect("answered");
            matches!(r, Err(s) if s.code() == Code::PermissionDenied)
        }
        None => RouterClient::with_transport(vec![addr.into()], transport.clone())
            .get_state()
            .await
            .is_ok(),
    }
}

/// The certificate (DER) a new connection to `addr` is shown, dialled with
/// `transport` expecting `expect`.
pub async fn presented(
    transport: &Transport,
    addr: &str,
    expect: Expect,
) -> Result<Vec<u8>, String> {
    transport
        .presented_certificate(addr, expect)
        .await
        .map(|c| c.to_vec())
        .map_err(|e| format!("{addr}: {e}"))
}

/// The DER of the first certificate in a PEM file.
pub fn certificate_der(pem_file: &std::path::Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(pem_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pem_file.display()))
        .next()
        .unwrap_or_else(|| panic!("{} holds no certificate", pem_file.display()))
        .unwrap_or_else(|e| panic!("{}: {e}", pem_file.display()))
        .to_vec()
}

/// The established IPv4 TCP connections (local, remote) of process `pid`, from
/// `/proc/<pid>/fd` and `/proc/net/tcp` (Linux). A connection dropped and dialled
/// again has another local port, so the same pair before and after means the same
/// connection stayed up.
pub fn established(pid: u32) -> BTreeSet<(SocketAddr, SocketAddr)> {
    let inodes: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/net/tcp: {e}"));
    parse_tcp_table(&table)
        .into_iter()
        .filter(|(_, _, state, inode)| *state == ESTABLISHED && inodes.contains(inode))
        .map(|(l, r, _, _)| (l, r))
        .collect()
}

/// `st` of an established connection in `/proc/net/tcp`.
const ESTABLISHED: u8 = 0x01;

/// (local, remote, state, inode) of every row of a `/proc/net/tcp` table.
fn parse_tcp_table(table: &str) -> Vec<(SocketAddr, SocketAddr, u8, u64)> {
    fn addr(hex: &str) -> Option<SocketAddr> {
        let (ip, port) = hex.split_once(':')?;
        // The address is a u32 printed in host order (little-endian here).
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(ip.to_le_bytes()),
            port,
        )))
    }
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some((
                addr(f.get(1)?)?,
                addr(f.get(2)?)?,
                u8::from_str_radix(f.get(3)?, 16).ok()?,
                f.get(9)?.parse().ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0500007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        let rows = parse_tcp_table(table);
        assert_eq!(
            rows,
            vec![(
                "127.0.0.1:8080".parse().unwrap(),
                "127.0.0.5:54321".parse().unwrap(),
                1,
                4242
            )]
        );
    }

    #[test]
    fn sees_its_own_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let pair = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        assert!(established(std::process::id()).contains(&pair));
    }
}
