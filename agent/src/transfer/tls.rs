//! Who we are on the data plane and whom we accept: TLS identity, rustls and
//! QUIC transport configuration, and the post-handshake host check.
//!
//! Trust is the fleet CA and nothing else: no system roots, so a certificate
//! from a public CA (or another fleet) never opens a connection. Every
//! configuration is built with the *ring* provider passed explicitly, so the
//! agent does not depend on (or fight over) rustls's process-wide default.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_protocol::RevocationList;
use flotilla_protocol::{transfer::ALPN, Bundle, HostName};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use super::TransferError;

/// Per-stream flow-control window: how much one stream may have in flight
/// unread. Large enough that one stream fills a gigabit LAN at a few ms RTT.
const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Per-connection flow-control window: the most unread data one peer can make
/// us buffer, whatever it does. This bounds memory per connection.
const RECEIVE_WINDOW: u32 = 32 << 20;
/// Unacknowledged data we keep per connection for retransmission.
const SEND_WINDOW: u64 = 32 << 20;
/// Streams a peer may have open towards us at once.
const MAX_BIDI_STREAMS: u32 = 64;
const MAX_UNI_STREAMS: u32 = 16;
/// Pings keep NAT and firewall state alive and notice a dead peer quickly.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A peer silent this long (4 missed keep-alives) is gone: a LAN that drops
/// every packet for 20 s is down, and a killed storage agent costs a source
/// 20 s before its job fails retryably (it was a minute: chaos kill-storage).
/// Keep-alives come from quinn's connection driver, not from the handlers,
/// so a busy peer is not mistaken for a dead one.
const IDLE_TIMEOUT_MS: u32 = 20_000;

/// This host's TLS identity from its enrollment bundle, with the rustls
/// configurations built from it.
///
/// Building them here, not when binding, means a broken bundle is reported
/// at startup with the bundle's name on it.
#[derive(Clone)]
pub struct Identity {
    host: HostName,
    server: Arc<QuicServerConfig>,
    client: Arc<QuicClientConfig>,
}

impl fmt::Debug for Identity {
    // The configurations hold the private key; show only whose identity it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// The certificates this agent refuses although the fleet CA signed them
/// (`flotilla revoke`), by SHA-256 of their DER. Shared by every handshake;
/// replaced whole when a newer signed list arrives.
#[derive(Debug, Clone, Default)]
pub struct RevokedCerts(Arc<RwLock<HashSet<[u8; 32]>>>);

impl RevokedCerts {
    /// Refuses exactly the certificates on `list` from now on.
    pub fn replace(&self, list: &RevocationList) {
        let set = list
            .revoked
            .iter()
            .filter_map(|r| {
                let mut out = [0u8; 32];
                hex_decode(&r.cert_sha256, &mut out).then_some(out)
            })
            .collect();
        if let Ok(mut guard) = self.0.write() {
            *guard = set;
        }
    }

    /// Whether `der` is revoked.
    pub fn contains(&self, der: &[u8]) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        self.0.read().map(|s| s.contains(&key)).unwrap_or(true)
    }

    /// How many certificates are refused.
    pub fn len(&self) -> usize {
        self.0.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex_decode(text: &str, out: &mut [u8; 32]) -> bool {
    if text.len() != 64 || !text.is_ascii() {
        return false;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        match u8::from_str_radix(&text[2 * i..2 * i + 2], 16) {
            Ok(b) => *byte = b,
            Err(_) => return false,
        }
    }
    true
}

/// The fleet CA's client verifier, refusing revoked certificates.
#[derive(Debug)]
struct CheckRevokedClient {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevokedCerts,
}

impl ClientCertVerifier for CheckRevokedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The fleet CA's server verifier, refusing revoked certificates.
#[derive(Debug)]
struct CheckRevokedServer {
    inner: Arc<WebPkiServerVerifier>,
    revoked: RevokedCerts,
}

impl ServerCertVerifier for CheckRevokedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl Identity {
    /// [`Identity::with_revocations`] with nothing revoked.
    pub fn from_bundle(bundle: &Bundle) -> Result<Identity, TransferError> {
        Self::with_revocations(bundle, RevokedCerts::default())
    }

    /// Reads the fleet CA, the host certificate and its key from `bundle`;
    /// every handshake also refuses a peer certificate in `revoked`.
    ///
    /// Fails if a PEM is missing or unreadable, if the certificate does not
    /// name the bundle's host, or if the key does not match the certificate.
    pub fn with_revocations(
        bundle: &Bundle,
        revoked: RevokedCerts,
    ) -> Result<Identity, TransferError> {
        let host = &bundle.host;
        let bundle_err = |what: &'static str| {
            move |detail: String| TransferError::Bundle {
                host: host.clone(),
                what,
                detail,
            }
        };
        let tls_err = |e: rustls::Error| TransferError::Tls {
            host: host.clone(),
            detail: e.to_string(),
        };

        let ca = CertificateDer::from_pem_slice(bundle.ca_cert.as_bytes())
            .map_err(|e| bundle_err("CA certificate")(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| bundle_err("CA certificate")(e.to_string()))?;
        let roots = Arc::new(roots);

        // The bundle holds the host certificate alone: the fleet CA signs host
        // certificates directly and every peer already has the CA.
        let cert = CertificateDer::from_pem_slice(bundle.cert.as_bytes())
            .map_err(|e| bundle_err("host certificate")(e.to_string()))?;
        check_names_host(&cert, host).map_err(|e| bundle_err("host certificate")(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(bundle.key.as_bytes())
            .map_err(|e| bundle_err("private key")(e.to_string()))?;
        let chain = vec![cert];

        let provider = Arc::new(rustls::crypto::ring::default_provider());

        // Server: every client must present a certificate chaining to the
        // fleet CA; anything else fails the handshake before a stream opens.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TransferError::Tls {
                    host: host.clone(),
                    detail: e.to_string(),
                })?;
        let client_verifier = Arc::new(CheckRevokedClient {
            inner: client_verifier,
            revoked: revoked.clone(),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // No session resumption: a resumed handshake skips the certificate
        // check, so a peer revoked since its last connection would be let
        // in on its old ticket. One full handshake per job costs nothing.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        // 0-RTT stays off (max_early_data_size is 0): early data can be
        // replayed by an attacker, and transfer requests must not be.

        // Client: the server must chain to the fleet CA and name the host we
        // dial (checked by rustls against the server name we pass).
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TransferError::Tls {
                host: host.clone(),
                detail: e.to_string(),
            })?;
        let server_verifier = Arc::new(CheckRevokedServer {
            inner: server_verifier,
            revoked,
        });
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(tls_err)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();

        // quinn needs the AES-128-GCM suite for QUIC's initial packets; the
        // ring provider always has it, but say so if that ever changes.
        let no_initial = |e: quinn::crypto::rustls::NoInitialCipherSuite| TransferError::Tls {
            host: host.clone(),
            detail: e.to_string(),
        };
        Ok(Identity {
            host: host.clone(),
            server: Arc::new(QuicServerConfig::try_from(server).map_err(no_initial)?),
            client: Arc::new(QuicClientConfig::try_from(client).map_err(no_initial)?),
        })
    }

    /// The host this identity belongs to.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// quinn server configuration: mutual TLS plus [`transport_config`].
    pub(crate) fn server_config(&self) -> quinn::ServerConfig {
        let mut config = quinn::ServerConfig::with_crypto(self.server.clone());
        config.transport_config(Arc::new(transport_config()));
        config
    }

    /// quinn client configuration: mutual TLS plus [`transport_config`].
    pub(crate) fn client_config(&self) -> quinn::ClientConfig {
        let mut config = quinn::ClientConfig::new(self.client.clone());
        config.transport_config(Arc::new(transport_config()));
        config
    }
}

/// The TLS client configuration for the fleet's NATS server: its certificate
/// must chain to the fleet CA from `bundle` (no system roots).
pub fn nats_tls_config(bundle: &Bundle) -> Result<rustls::ClientConfig, TransferError> {
    let host = &bundle.host;
    let ca = CertificateDer::from_pem_slice(bundle.ca_cert.as_bytes()).map_err(|e| {
        TransferError::Bundle {
            host: host.clone(),
            what: "CA certificate",
            detail: e.to_string(),
        }
    })?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| TransferError::Bundle {
        host: host.clone(),
        what: "CA certificate",
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransferError::Tls {
            host: host.clone(),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// QUIC transport settings for agents on a LAN, used on both sides.
///
/// Flow-control windows are what bound memory: a peer can never make us
/// buffer more than `receive_window` (32 MiB) of unread data per connection,
/// however many streams it opens, and at most `stream_receive_window` (8 MiB)
/// of that on one stream. The windows are still wide enough for a single
/// connection to fill a 10 Gbit/s LAN link (32 MiB covers ~25 ms of RTT at
/// that rate), so several streams in parallel are for overlap, not throughput.
/// Stream limits bound per-peer bookkeeping; the keep-alive and idle timeout
/// turn a vanished peer into `TimedOut` within 20 s instead of a hang.
pub fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))));
    config
}

/// Checks, on the server after the handshake, that the client's certificate
/// names `expected`.
///
/// The handshake already verified the chain against the fleet CA, so any
/// fleet member gets this far; this is what stops host A from presenting its
/// own valid certificate while claiming (in a signed task) to be host B.
pub fn peer_host(conn: &quinn::Connection, expected: &HostName) -> Result<(), TransferError> {
    let addr = conn.remote_address();
    let certs = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TransferError::NoPeerCertificate { addr })?;
    let leaf = certs
        .first()
        .ok_or(TransferError::NoPeerCertificate { addr })?;
    check_names_host(leaf, expected).map_err(|e| TransferError::PeerNotHost {
        addr,
        expected: expected.clone(),
        detail: e.to_string(),
    })
}

/// `host` as the DNS name certificates are checked against.
///
/// [`HostName`] allows a few names DNS does not (all digits, a trailing
/// `-`); such a host cannot take part in the data plane.
pub(crate) fn server_name(host: &HostName) -> Result<ServerName<'static>, TransferError> {
    ServerName::try_from(host.as_str().to_owned()).map_err(|_| TransferError::InvalidName {
        host: host.clone(),
        why: "not a valid DNS name: all digits, or ending in '-'",
    })
}

/// Why a certificate does not name the host it should.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertNameError {
    /// The host's name is no DNS name, so no certificate can name it.
    #[error(transparent)]
    HostName(Box<TransferError>),
    /// The certificate's DER does not parse.
    #[error("cannot parse the certificate: {0}")]
    Parse(#[source] webpki::Error),
    /// The certificate's subject alternative names do not include the host.
    #[error("the certificate is not for {host} ({source})")]
    NotFor {
        /// The host it should name.
        host: HostName,
        /// What webpki found.
        #[source]
        source: webpki::Error,
    },
}

/// Whether the end-entity certificate `der` is valid for `host` (its subject
/// alternative names; webpki ignores the common name). The error says why not.
fn check_names_host(der: &CertificateDer<'_>, host: &HostName) -> Result<(), CertNameError> {
    let name = server_name(host).map_err(|e| CertNameError::HostName(Box::new(e)))?;
    let cert = webpki::EndEntityCert::try_from(der).map_err(CertNameError::Parse)?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|source| CertNameError::NotFor {
            host: host.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::testing::{bundle_for, TestCa};

    #[test]
    fn identity_reads_a_bundle() {
        let ca = TestCa::new("fleet");
        let identity = Identity::from_bundle(&bundle_for(&ca, "nas")).expect("identity");
        assert_eq!(identity.host().as_str(), "nas");
        assert!(!format!("{identity:?}").contains("PRIVATE"));
    }

    #[test]
    fn identity_refuses_a_certificate_for_another_host() {
        let ca = TestCa::new("fleet");
        let mut bundle = bundle_for(&ca, "nas");
        bundle.host = HostName::new("laptop").expect("valid");
        let err = Identity::from_bundle(&bundle).expect_err("wrong host");
        assert!(matches!(err, TransferError::Bundle { .. }), "{err:?}");
        assert!(err.to_string().contains("not for laptop"), "{err}");
    }

    #[test]
    fn a_certificate_is_checked_against_the_host_it_should_name() {
        let ca = TestCa::new("fleet");
        let pem = bundle_for(&ca, "nas").cert;
        let cert = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        check_names_host(&cert, &HostName::new("nas").expect("valid")).expect("names nas");
        let err = check_names_host(&cert, &HostName::new("laptop").expect("valid"))
            .expect_err("not laptop");
        assert!(matches!(err, CertNameError::NotFor { .. }), "{err:?}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "webpki's reason is kept"
        );
        let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        let err =
            check_names_host(&garbage, &HostName::new("nas").expect("valid")).expect_err("garbage");
        assert!(matches!(err, CertNameError::Parse(_)), "{err:?}");
    }

    #[test]
    fn identity_refuses_a_key_that_does_not_match() {
        let ca = TestCa::new("fleet");
        let mut bundle = bundle_for(&ca, "nas");
        bundle.key = bundle_for(&ca, "nas").key;
        let err = Identity::from_bundle(&bundle).expect_err("mismatched key");
        assert!(matches!(err, TransferError::Tls { .. }), "{err:?}");
    }

    #[test]
    fn identity_refuses_garbage_pem() {
        let ca = TestCa::new("fleet");
        let mut bundle = bundle_for(&ca, "nas");
        bundle.ca_cert = "not a certificate".into();
        let err = Identity::from_bundle(&bundle).expect_err("garbage");
        assert!(err.to_string().contains("CA certificate"), "{err}");
    }

    #[test]
    fn every_valid_host_name_is_a_server_name() {
        // HostName requires a leading letter, so no host name can be mistaken
        // for an IP address or fail to be a DNS name.
        for name in ["nas", "a", "db01", "laptop-2"] {
            assert!(
                server_name(&HostName::new(name).expect("valid")).is_ok(),
                "{name}"
            );
        }
    }
}
