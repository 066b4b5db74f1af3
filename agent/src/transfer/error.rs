//! Everything that can go wrong on the data plane, and whether trying again
//! can help.
//!
//! Connection-level errors name the peer's address. Stream-level errors
//! (framing, resets) do not: a quinn stream does not know its connection, so the
//! caller's connection span (`peer` field) says which peer it was.

use std::net::SocketAddr;

use flotilla_protocol::{DecodeError, EncodeError, HostName};
use quinn::{ConnectionError, ReadError, TransportErrorCode, WriteError};

/// A failure of the QUIC data plane.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The bundle's certificates or key cannot be read.
    #[error("bundle for {host}: cannot read the {what}: {detail}; re-enroll the host with `flotilla enroll {host}`")]
    Bundle {
        /// The bundle's host.
        host: HostName,
        /// Which part: "CA certificate", "host certificate" or "private key".
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// rustls refused to build a TLS configuration from the bundle.
    #[error("bundle for {host}: cannot build the TLS configuration: {detail}; re-enroll the host with `flotilla enroll {host}`")]
    Tls {
        /// The bundle's host.
        host: HostName,
        /// Why.
        detail: String,
    },
    /// A host name that is not a valid DNS name, so no certificate can name it.
    #[error("host name {host} cannot be checked against a certificate ({why}); rename the host")]
    InvalidName {
        /// The name.
        host: HostName,
        /// Why.
        why: &'static str,
    },
    /// The UDP socket could not be bound.
    #[error("cannot listen for QUIC on {addr}: {source}; check --listen and that no other process holds the port")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// quinn refused to start a connection (endpoint shutting down, bad address).
    #[error("cannot start a QUIC connection to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The peer is not the host we meant to talk to: its certificate is not
    /// from this fleet's CA, or names another host.
    #[error("peer at {addr} is not host {expected}: {detail}; check the address advertised for {expected} and that both hosts are enrolled in this fleet")]
    PeerNotHost {
        /// The peer.
        addr: SocketAddr,
        /// Who we expected.
        expected: HostName,
        /// What the check found.
        detail: String,
    },
    /// A client presented a certificate this fleet does not accept (or none).
    #[error("refused a connection from {addr}: its certificate is not accepted by this fleet ({detail}); enroll that host in this fleet or stop it from connecting")]
    Untrusted {
        /// The client.
        addr: SocketAddr,
        /// What the check found.
        detail: String,
    },
    /// The peer refused our certificate or our protocol version in the handshake.
    #[error("peer at {addr} refused the TLS handshake: {detail}; check that both hosts are enrolled in the same fleet and run compatible Flotilla versions")]
    Refused {
        /// The peer.
        addr: SocketAddr,
        /// The alert it sent.
        detail: String,
    },
    /// The TLS handshake failed for a reason other than a certificate.
    #[error("TLS handshake with {addr} failed: {detail}; check that both hosts run compatible Flotilla versions")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The peer did not answer in time.
    #[error("connection to {addr} timed out; the host may be down or a firewall drops UDP to it")]
    TimedOut {
        /// The peer.
        addr: SocketAddr,
    },
    /// An established connection (or its handshake) broke.
    #[error("connection to {addr} lost: {source}")]
    ConnectionLost {
        /// The peer.
        addr: SocketAddr,
        /// What quinn saw.
        source: ConnectionError,
    },
    /// The handshake completed without a peer certificate chain; mutual TLS
    /// makes this impossible unless the connection was set up elsewhere.
    #[error("peer at {addr} presented no certificate; refusing it")]
    NoPeerCertificate {
        /// The peer.
        addr: SocketAddr,
    },
    /// The connection broke during a stream operation.
    #[error("connection lost during a transfer: {0}")]
    StreamLost(#[source] ConnectionError),
    /// The peer abandoned the stream it was sending on.
    #[error("peer reset its stream with code {code}")]
    StreamReset {
        /// Application code the peer gave.
        code: u64,
    },
    /// The peer stopped reading the stream we were sending on.
    #[error("peer stopped reading our stream with code {code}")]
    StreamStopped {
        /// Application code the peer gave.
        code: u64,
    },
    /// Our own misuse of a stream (already finished, unordered read): a bug.
    #[error("stream used after it was closed or out of order ({0}); this is a bug in Flotilla")]
    StreamMisuse(&'static str),
    /// A frame's length prefix is over the reader's limit; nothing was allocated.
    #[error("peer sent a frame of {len} bytes, over the limit of {limit} bytes; it is misbehaving or runs an incompatible version")]
    FrameTooLarge {
        /// Length the prefix claimed.
        len: u64,
        /// The reader's limit.
        limit: usize,
    },
    /// The stream ended inside a frame.
    #[error("peer's stream ended {got} bytes into a frame of {expected} bytes (length prefix included); it is misbehaving or crashed")]
    Truncated {
        /// Bytes of the frame received, prefix included.
        got: u64,
        /// Bytes the frame should have had, prefix included (4 while the
        /// prefix itself was incomplete).
        expected: u64,
    },
    /// A complete frame that does not decode as the expected message.
    #[error("malformed frame from peer: {0}; it runs an incompatible version or is misbehaving")]
    Malformed(#[source] DecodeError),
    /// A message we were about to send could not be encoded: a bug.
    #[error("cannot encode a frame: {0}")]
    Encode(#[source] EncodeError),
    /// A message we were about to send does not fit a `u32` length prefix: a bug.
    #[error("frame of {len} bytes is too large to send (over 4 GiB); this is a bug in Flotilla")]
    EncodedTooLarge {
        /// Its encoded size.
        len: usize,
    },
}

impl TransferError {
    /// Whether the same operation may succeed later.
    ///
    /// Lost connections and timeouts pass (a peer restarting, a network
    /// blip). Certificate, identity and framing failures do not: the same
    /// peer with the same certificate and software fails the same way.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::TimedOut { .. } => true,
            TransferError::ConnectionLost { source, .. } | TransferError::StreamLost(source) => {
                connection_error_is_retryable(source)
            }
            // A peer that aborts a stream on purpose does it for an
            // application reason its code names; the protocol layer that
            // defines the codes decides. A peer shutting down closes the
            // whole connection instead, which is retryable above.
            TransferError::StreamReset { .. } | TransferError::StreamStopped { .. } => false,
            TransferError::Bundle { .. }
            | TransferError::Tls { .. }
            | TransferError::InvalidName { .. }
            | TransferError::Bind { .. }
            | TransferError::Connect { .. }
            | TransferError::PeerNotHost { .. }
            | TransferError::Untrusted { .. }
            | TransferError::Refused { .. }
            | TransferError::Handshake { .. }
            | TransferError::NoPeerCertificate { .. }
            | TransferError::StreamMisuse(_)
            | TransferError::FrameTooLarge { .. }
            | TransferError::Truncated { .. }
            | TransferError::Malformed(_)
            | TransferError::Encode(_)
            | TransferError::EncodedTooLarge { .. } => false,
        }
    }

    /// Classifies a failed handshake (or a connection that broke) with `addr`.
    ///
    /// `expected` is the host a client meant to reach; `None` on the server,
    /// which learns who the client claims to be only after the handshake.
    pub(crate) fn from_connection(
        addr: SocketAddr,
        expected: Option<&HostName>,
        error: ConnectionError,
    ) -> TransferError {
        match error {
            // Our own TLS stack rejected the peer: rustls raised an alert
            // locally while verifying what the peer sent.
            ConnectionError::TransportError(ref e) if tls_alert(e.code).is_some() => {
                let certificate = tls_alert(e.code).is_some_and(is_certificate_alert);
                match (certificate, expected) {
                    (true, Some(expected)) => TransferError::PeerNotHost {
                        addr,
                        expected: expected.clone(),
                        detail: e.reason.clone(),
                    },
                    (true, None) => TransferError::Untrusted {
                        addr,
                        detail: e.reason.clone(),
                    },
                    (false, _) => TransferError::Handshake {
                        addr,
                        detail: e.to_string(),
                    },
                }
            }
            // The peer's TLS stack rejected us and told us with an alert.
            ConnectionError::ConnectionClosed(ref close)
                if tls_alert(close.error_code).is_some() =>
            {
                TransferError::Refused {
                    addr,
                    detail: close.to_string(),
                }
            }
            ConnectionError::TimedOut => TransferError::TimedOut { addr },
            source => TransferError::ConnectionLost { addr, source },
        }
    }
}

/// Whether a broken connection may work if opened again.
fn connection_error_is_retryable(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::TimedOut
        | ConnectionError::Reset
        | ConnectionError::ApplicationClosed(_)
        | ConnectionError::CidsExhausted => true,
        // The peer's stack aborted: a TLS alert is permanent, anything else
        // (an internal error, a flow-control dispute) may clear on reconnect.
        ConnectionError::ConnectionClosed(close) => tls_alert(close.error_code).is_none(),
        // We saw the peer break the protocol; it will do it again.
        ConnectionError::TransportError(_) | ConnectionError::VersionMismatch => false,
        // We closed it ourselves: we are shutting down.
        ConnectionError::LocallyClosed => false,
    }
}

/// The TLS alert in a QUIC "crypto error" code (0x100 + alert, RFC 9001 §4.8).
fn tls_alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    // The range check makes the truncation exact.
    (0x100..0x200)
        .contains(&code)
        .then_some((code & 0xff) as u8)
}

/// Alerts that mean "your certificate is not acceptable" (RFC 8446 §6.2).
fn is_certificate_alert(alert: u8) -> bool {
    matches!(
        alert,
        42 // bad_certificate: e.g. not valid for the expected name
        | 43 // unsupported_certificate: wrong key usage
        | 44 // certificate_revoked
        | 45 // certificate_expired (or not yet valid)
        | 46 // certificate_unknown
        | 48 // unknown_ca: not issued by this fleet's CA
        | 116 // certificate_required: none presented
    )
}

impl From<ConnectionError> for TransferError {
    /// A connection error met during a stream operation, such as `open_bi`.
    fn from(error: ConnectionError) -> Self {
        TransferError::StreamLost(error)
    }
}

impl From<ReadError> for TransferError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Reset(code) => TransferError::StreamReset {
                code: u64::from(code),
            },
            ReadError::ConnectionLost(e) => TransferError::StreamLost(e),
            ReadError::ClosedStream => TransferError::StreamMisuse("read from a closed stream"),
            ReadError::IllegalOrderedRead => {
                TransferError::StreamMisuse("ordered read after an unordered one")
            }
            // We never open 0-RTT streams: early data can be replayed.
            ReadError::ZeroRttRejected => TransferError::StreamMisuse("0-RTT stream rejected"),
        }
    }
}

impl From<WriteError> for TransferError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Stopped(code) => TransferError::StreamStopped {
                code: u64::from(code),
            },
            WriteError::ConnectionLost(e) => TransferError::StreamLost(e),
            WriteError::ClosedStream => TransferError::StreamMisuse("write to a closed stream"),
            WriteError::ZeroRttRejected => TransferError::StreamMisuse("0-RTT stream rejected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 10], 7443))
    }

    /// The close a peer's TLS stack sends with an alert. (A locally raised
    /// alert is a `quinn::TransportError`, whose type quinn does not export;
    /// the handshake tests in `endpoint.rs` cover that path.)
    fn peer_alert(alert: u8) -> ConnectionError {
        ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: bytes::Bytes::from_static(b"invalid peer certificate: UnknownIssuer"),
        })
    }

    #[test]
    fn peer_alerts_are_refusals_and_permanent() {
        let nas = HostName::new("nas").expect("valid");
        let refused = TransferError::from_connection(addr(), Some(&nas), peer_alert(48));
        assert!(
            matches!(refused, TransferError::Refused { .. }),
            "{refused:?}"
        );
        assert!(refused
            .to_string()
            .starts_with("peer at 192.0.2.10:7443 refused the TLS handshake: "));
        assert!(!refused.is_retryable());
        assert!(!TransferError::StreamLost(peer_alert(116)).is_retryable());
        assert_eq!(tls_alert(TransportErrorCode::crypto(48)), Some(48));
        assert!(is_certificate_alert(48) && !is_certificate_alert(40));
    }

    #[test]
    fn timeouts_and_resets_are_retryable() {
        let lost = TransferError::from_connection(addr(), None, ConnectionError::Reset);
        assert!(lost.is_retryable());
        let timed_out = TransferError::from_connection(addr(), None, ConnectionError::TimedOut);
        assert!(matches!(timed_out, TransferError::TimedOut { .. }));
        assert!(timed_out.is_retryable());
        assert!(!TransferError::StreamLost(ConnectionError::LocallyClosed).is_retryable());
        let too_large = TransferError::FrameTooLarge {
            len: u64::from(u32::MAX),
            limit: 1024,
        };
        assert!(!too_large.is_retryable());
    }
}
