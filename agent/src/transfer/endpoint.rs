//! The agent's one QUIC socket: it accepts peers and dials them.
//!
//! One UDP socket serves both directions so that the address an agent
//! advertises (`quic_addr` in its heartbeat) is also the source of its own
//! connections, and a firewall needs one rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use flotilla_protocol::HostName;
use quinn::VarInt;
use tracing::{debug, info};

use super::tls::server_name;
use super::{Identity, TransferError};

/// Longest a handshake may take. On a LAN it takes milliseconds; without this
/// bound a dial to a host that is down would wait the whole idle timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Close code for connections that end because this agent is shutting down.
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);

/// This agent's data-plane endpoint: a QUIC server and client on one socket.
///
/// Cheap to clone; every clone drives the same socket.
#[derive(Debug, Clone)]
pub struct TransferEndpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    host: HostName,
}

impl TransferEndpoint {
    /// Binds `addr` (port 0 picks a free one) and starts accepting
    /// connections from fleet members.
    ///
    /// Must be called inside a tokio runtime: the socket is registered with it.
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<TransferEndpoint, TransferError> {
        let endpoint = quinn::Endpoint::server(identity.server_config(), addr)
            .map_err(|source| TransferError::Bind { addr, source })?;
        let local = endpoint
            .local_addr()
            .map_err(|source| TransferError::Bind { addr, source })?;
        info!(host = %identity.host(), %local, "QUIC data plane listening");
        Ok(TransferEndpoint {
            endpoint,
            client: identity.client_config(),
            host: identity.host().clone(),
        })
    }

    /// The address the socket is bound to (with the real port if 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This agent's host name.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// Dials `addr` and completes the handshake, which fails unless the
    /// server's certificate is from the fleet CA and names `expected_host`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected_host: &HostName,
    ) -> Result<quinn::Connection, TransferError> {
        // quinn would refuse such a name too, but with a message about TLS
        // server names rather than about the host.
        server_name(expected_host)?;
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, expected_host.as_str())
            .map_err(|source| TransferError::Connect { addr, source })?;
        // Dropping `connecting` on timeout abandons the attempt.
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_elapsed) => return Err(TransferError::TimedOut { addr }),
            Ok(Err(e)) => return Err(TransferError::from_connection(addr, Some(expected_host), e)),
            Ok(Ok(conn)) => conn,
        };
        debug!(peer = %addr, host = %expected_host, "QUIC connection established");
        Ok(conn)
    }

    /// The next incoming connection attempt, or `None` once the endpoint is
    /// closed.
    ///
    /// The handshake is not run here: call [`IncomingConnection::establish`] in a task
    /// of its own, so that one slow peer cannot hold up the others.
    pub async fn accept(&self) -> Option<IncomingConnection> {
        let inner = self.endpoint.accept().await?;
        Some(IncomingConnection { inner })
    }

    /// Closes every connection (peers see an application close with code 0,
    /// "shutting down", which they treat as retryable) and waits briefly for
    /// the close to reach them.
    ///
    /// Call it after the tasks using connections have stopped: streams still
    /// in use fail with `StreamLost`.
    pub async fn shutdown(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutting down");
        // wait_idle returns once every connection has sent its close and
        // drained (a few round trips); bound it in case a peer is gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!(host = %self.host, "QUIC data plane closed");
    }
}

/// A connection attempt from a peer, before its handshake.
#[derive(Debug)]
pub struct IncomingConnection {
    inner: quinn::Incoming,
}

impl IncomingConnection {
    /// The address the attempt comes from (not yet authenticated).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Turns the attempt away without a handshake (e.g. while shutting down).
    pub fn refuse(self) {
        self.inner.refuse();
    }

    /// Completes the handshake, which fails unless the client presents a
    /// certificate from the fleet CA.
    ///
    /// Which fleet member it is remains to be checked with
    /// `peer_host` once the server knows whom to expect.
    pub async fn establish(self) -> Result<quinn::Connection, TransferError> {
        let addr = self.inner.remote_address();
        let connecting = self
            .inner
            .accept()
            .map_err(|e| TransferError::from_connection(addr, None, e))?;
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_elapsed) => return Err(TransferError::TimedOut { addr }),
            Ok(Err(e)) => return Err(TransferError::from_connection(addr, None, e)),
            Ok(Ok(conn)) => conn,
        };
        debug!(peer = %addr, "QUIC connection accepted");
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::HostName;
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::transfer::testing::{bundle_for, endpoint, handshake, mixed_bundle, within, TestCa};
    use crate::transfer::{peer_host, read_frame, write_frame, Identity, RevokedCerts};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
        text: String,
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("test host name")
    }

    #[tokio::test]
    async fn fleet_members_connect_check_each_other_and_exchange_frames() {
        let ca = TestCa::new("fleet");
        let (server, server_addr) = endpoint(&bundle_for(&ca, "nas"));
        let (client, _) = endpoint(&bundle_for(&ca, "laptop"));

        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let client_conn = client_conn.expect("client side");
        let server_conn = server_conn.expect("server side");
        peer_host(&server_conn, &host("laptop")).expect("client is laptop");

        let serve = async {
            let (mut send, mut recv) = server_conn.accept_bi().await.expect("accept stream");
            let ping: Ping = read_frame(&mut recv, 1024)
                .await
                .expect("read")
                .expect("a frame");
            write_frame(
                &mut send,
                &Ping {
                    n: ping.n + 1,
                    text: "pong".into(),
                },
            )
            .await
            .expect("reply");
            send.finish().expect("finish");
            // The client reads to the end of our stream; keep the
            // connection until it closes it.
            server_conn.closed().await
        };
        let ask = async {
            let (mut send, mut recv) = client_conn.open_bi().await.expect("open stream");
            write_frame(
                &mut send,
                &Ping {
                    n: 1,
                    text: "ping".into(),
                },
            )
            .await
            .expect("send");
            send.finish().expect("finish");
            let pong: Option<Ping> = read_frame(&mut recv, 1024).await.expect("read");
            let end: Option<Ping> = read_frame(&mut recv, 1024).await.expect("clean end");
            client_conn.close(VarInt::from_u32(0), b"done");
            (pong, end)
        };
        let (_, (pong, end)) = within("exchange", futures::future::join(serve, ask)).await;
        assert_eq!(
            pong,
            Some(Ping {
                n: 2,
                text: "pong".into()
            })
        );
        assert_eq!(end, None);
        server.shutdown().await;
        client.shutdown().await;
    }

    #[tokio::test]
    async fn client_refuses_a_server_certified_for_another_host() {
        let ca = TestCa::new("fleet");
        let (server, server_addr) = endpoint(&bundle_for(&ca, "other"));
        let (client, _) = endpoint(&bundle_for(&ca, "laptop"));

        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let err = client_conn.expect_err("server is not nas");
        assert!(matches!(err, TransferError::PeerNotHost { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("peer at {server_addr} is not host nas: ")),
            "{err}"
        );
        assert!(!err.is_retryable());
        // The server learns of it as a refusal of its own certificate.
        let server_err = server_conn.expect_err("client aborted");
        assert!(!server_err.is_retryable(), "{server_err:?}");
    }

    #[tokio::test]
    async fn server_refuses_a_client_from_another_ca() {
        let fleet = TestCa::new("fleet");
        let stranger = TestCa::new("stranger");
        let (server, server_addr) = endpoint(&bundle_for(&fleet, "nas"));
        // The intruder trusts the fleet CA (so it accepts the server) but its
        // own certificate comes from elsewhere: only the server can stop it.
        let (client, _) = endpoint(&mixed_bundle(&fleet, &stranger, "laptop"));

        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let server_err = server_conn.expect_err("server refuses the client");
        assert!(
            matches!(server_err, TransferError::Untrusted { .. }),
            "{server_err:?}"
        );
        assert!(!server_err.is_retryable());

        // In TLS 1.3 the client may finish its side of the handshake before
        // the server has judged its certificate; then the first stream
        // operation fails instead.
        if let Ok(conn) = client_conn {
            let attempt = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_frame(&mut send, &1u32).await?;
                read_frame::<u32>(&mut recv, 1024).await
            };
            let err = within("first stream operation", attempt)
                .await
                .expect_err("the connection was refused");
            assert!(!err.is_retryable(), "{err:?}");
        }
    }

    /// `host`'s certificate on a revocation list of `ca`'s fleet.
    fn revocation_of(
        ca: &TestCa,
        bundle: &flotilla_protocol::Bundle,
    ) -> flotilla_protocol::RevocationList {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(bundle.cert.as_bytes())
            .expect("certificate PEM");
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        flotilla_protocol::RevocationList {
            v: flotilla_protocol::REVOCATION_VERSION,
            fleet: ca.fleet.clone(),
            issued: 1,
            revoked: vec![flotilla_protocol::RevokedCert {
                host: bundle.host.clone(),
                cert_sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
                revoked_at: 1,
            }],
        }
    }

    #[tokio::test]
    async fn a_revoked_client_is_refused_from_the_moment_the_list_arrives() {
        let ca = TestCa::new("fleet");
        let revoked = RevokedCerts::default();
        let identity =
            Identity::with_revocations(&bundle_for(&ca, "nas"), revoked.clone()).expect("identity");
        let server =
            TransferEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &identity).expect("bind");
        let server_addr = server.local_addr().expect("address");
        let laptop = bundle_for(&ca, "laptop");
        let (client, _) = endpoint(&laptop);

        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        client_conn.expect("before the revocation the client is accepted");
        server_conn.expect("before the revocation the server accepts");

        // The running endpoint's set is replaced: no restart, no rebind.
        revoked.replace(&revocation_of(&ca, &laptop));
        assert_eq!(revoked.len(), 1);
        let (_, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let err = server_conn.expect_err("a revoked client is refused");
        assert!(matches!(err, TransferError::Untrusted { .. }), "{err:?}");
        assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");
        assert!(!err.is_retryable());

        // Another host of the fleet is still welcome.
        let (desktop, _) = endpoint(&bundle_for(&ca, "desktop"));
        let (c, s) = handshake(&desktop, &server, server_addr, "nas").await;
        c.expect("desktop is not revoked");
        s.expect("desktop is accepted");
    }

    #[tokio::test]
    async fn a_client_refuses_a_revoked_server() {
        let ca = TestCa::new("fleet");
        let nas = bundle_for(&ca, "nas");
        let (server, server_addr) = endpoint(&nas);
        let revoked = RevokedCerts::default();
        let identity = Identity::with_revocations(&bundle_for(&ca, "laptop"), revoked.clone())
            .expect("identity");
        let client =
            TransferEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &identity).expect("bind");

        // A connection before the revocation, used for a stream, so that a
        // server willing to hand out session tickets has done so.
        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let (client_conn, server_conn) =
            (client_conn.expect("client"), server_conn.expect("server"));
        let echo = async {
            let (mut send, mut recv) = server_conn.accept_bi().await.expect("accept");
            let n: u32 = read_frame(&mut recv, 64)
                .await
                .expect("read")
                .expect("frame");
            write_frame(&mut send, &n).await.expect("write");
            send.finish().expect("finish");
            server_conn.closed().await;
        };
        let ask = async {
            let (mut send, mut recv) = client_conn.open_bi().await.expect("open");
            write_frame(&mut send, &7u32).await.expect("write");
            let back: Option<u32> = read_frame(&mut recv, 64).await.expect("read");
            client_conn.close(VarInt::from_u32(0), b"done");
            back
        };
        let (_, back) = within("exchange", futures::future::join(echo, ask)).await;
        assert_eq!(back, Some(7));

        // Revoked now: a new connection must check the certificate again
        // (no resumption from the earlier one's ticket).
        revoked.replace(&revocation_of(&ca, &nas));
        let (client_conn, _) = handshake(&client, &server, server_addr, "nas").await;
        let err = client_conn.expect_err("a revoked storage host is refused");
        assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn server_side_host_check_refuses_the_wrong_host() {
        let ca = TestCa::new("fleet");
        let (server, server_addr) = endpoint(&bundle_for(&ca, "nas"));
        let (client, _) = endpoint(&bundle_for(&ca, "laptop"));

        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let _client_conn = client_conn.expect("client side");
        let server_conn = server_conn.expect("server side");
        let err = peer_host(&server_conn, &host("desktop")).expect_err("laptop is not desktop");
        assert!(matches!(err, TransferError::PeerNotHost { .. }), "{err:?}");
        assert!(err.to_string().contains("is not host desktop"), "{err}");
        assert!(!err.is_retryable());
    }
}

/// Where the advertised QUIC address came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvertisedFrom {
    /// `--advertise`.
    Flag,
    /// The bound address itself.
    Bound,
    /// The bound port on the interface that reaches NATS (bound to a
    /// wildcard address).
    Route,
    /// Bound to a wildcard address and no route found: peers cannot dial it.
    Unroutable,
}

/// The address peers should dial: `--advertise` when given; else the bound
/// address, unless it is a wildcard (`0.0.0.0`, `[::]`), which no peer can
/// dial: then the bound port on `route_ip`, the address of the interface
/// this host reaches NATS through (what other hosts can most likely reach).
pub fn advertised_addr(
    bound: SocketAddr,
    advertise: Option<SocketAddr>,
    route_ip: impl FnOnce() -> Option<IpAddr>,
) -> (SocketAddr, AdvertisedFrom) {
    if let Some(addr) = advertise {
        return (addr, AdvertisedFrom::Flag);
    }
    if !bound.ip().is_unspecified() {
        return (bound, AdvertisedFrom::Bound);
    }
    match route_ip() {
        Some(ip) if !ip.is_unspecified() => {
            (SocketAddr::new(ip, bound.port()), AdvertisedFrom::Route)
        }
        _ => (bound, AdvertisedFrom::Unroutable),
    }
}

/// The local address of the interface the kernel routes `nats_url`'s first
/// server through: a UDP socket "connected" to it (nothing is sent) is
/// given the source address the kernel would use. `None` when the URL does
/// not resolve or there is no route.
pub fn route_ip_to(nats_url: &str) -> Option<IpAddr> {
    let first = nats_url.split(',').next()?.trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    // Credentials in the URL (user:pass@host) are not the host.
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split('/').next()?;
    let with_port = if host_port.starts_with('[') {
        if host_port.contains("]:") {
            host_port.to_owned()
        } else {
            format!("{host_port}:4222")
        }
    } else if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:4222")
    };
    let target = with_port.to_socket_addrs().ok()?.next()?;
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod advertise_tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_flag_wins_then_a_concrete_bound_address() {
        let never = || -> Option<IpAddr> { panic!("no route lookup needed") };
        assert_eq!(
            advertised_addr(addr("0.0.0.0:7443"), Some(addr("192.0.2.7:9000")), never),
            (addr("192.0.2.7:9000"), AdvertisedFrom::Flag)
        );
        assert_eq!(
            advertised_addr(addr("10.0.0.5:7443"), None, never),
            (addr("10.0.0.5:7443"), AdvertisedFrom::Bound)
        );
    }

    #[test]
    fn a_wildcard_takes_the_route_to_nats_with_the_bound_port() {
        let route = || Some("10.1.2.3".parse().unwrap());
        assert_eq!(
            advertised_addr(addr("0.0.0.0:7443"), None, route),
            (addr("10.1.2.3:7443"), AdvertisedFrom::Route)
        );
        assert_eq!(
            advertised_addr(addr("[::]:7443"), None, || Some("fd00::9".parse().unwrap())),
            (addr("[fd00::9]:7443"), AdvertisedFrom::Route)
        );
        assert_eq!(
            advertised_addr(addr("0.0.0.0:7443"), None, || None),
            (addr("0.0.0.0:7443"), AdvertisedFrom::Unroutable)
        );
    }

    #[test]
    fn the_route_to_a_loopback_server_is_loopback() {
        for url in [
            "nats://127.0.0.1:4222",
            "tls://user:pw@127.0.0.1:4222",
            "127.0.0.1",
            "nats://127.0.0.1:4222,nats://192.0.2.1:4222",
        ] {
            assert_eq!(
                route_ip_to(url),
                Some("127.0.0.1".parse().unwrap()),
                "{url}"
            );
        }
        assert_eq!(route_ip_to("nats://host.invalid:4222"), None);
    }
}
