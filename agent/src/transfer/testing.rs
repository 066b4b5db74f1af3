//! Test fixtures: throwaway fleet CAs, host bundles, and connected endpoints.
//!
//! Certificates are made the way `flotilla enroll` makes them
//! (`coordinator/src/fleet.rs`): a CA constrained to sign end entities only,
//! and host certificates whose CN and only DNS SAN are the host name, with
//! both server and client EKUs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_protocol::{Bundle, HostName, BUNDLE_VERSION};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{Identity, TransferEndpoint, TransferError};

/// How long any single step of a test may take before the test fails
/// instead of hanging.
pub(crate) const STEP: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test after [`STEP`].
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

/// A fleet CA for tests.
pub(crate) struct TestCa {
    pub(crate) fleet: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(fleet: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Flotilla fleet {fleet} CA"));
        dn.push(DnType::OrganizationName, "Flotilla");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        TestCa {
            fleet: fleet.to_owned(),
            issuer,
        }
    }

    /// The CA certificate, PEM.
    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A new certificate and key for `host`: (certificate PEM, key PEM).
    pub(crate) fn issue(&self, host: &str) -> (String, String) {
        let key = KeyPair::generate().expect("host key");
        let mut params = CertificateParams::new(vec![host.to_owned()]).expect("host params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        dn.push(
            DnType::OrganizationName,
            format!("Flotilla fleet {}", self.fleet),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("host certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A bundle for `host` in `ca`'s fleet.
pub(crate) fn bundle_for(ca: &TestCa, host: &str) -> Bundle {
    mixed_bundle(ca, ca, host)
}

/// A bundle for `host` that trusts `trusts` but whose certificate was issued
/// by `issuer`: a host that knows the fleet but is not enrolled in it.
pub(crate) fn mixed_bundle(trusts: &TestCa, issuer: &TestCa, host: &str) -> Bundle {
    let (cert, key) = issuer.issue(host);
    Bundle {
        version: BUNDLE_VERSION,
        fleet: trusts.fleet.clone(),
        host: HostName::new(host).expect("test host name"),
        nats_url: "nats://127.0.0.1:4222".into(),
        coordinator_key: "00".repeat(32),
        ca_cert: trusts.pem(),
        cert,
        key,
        repo_key: None,
        nats_creds: None,
    }
}

/// An endpoint on a free loopback port with `bundle`'s identity.
pub(crate) fn endpoint(bundle: &Bundle) -> (TransferEndpoint, SocketAddr) {
    let identity = Identity::from_bundle(bundle).expect("identity");
    let endpoint =
        TransferEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &identity).expect("bind");
    let addr = endpoint.local_addr().expect("local address");
    (endpoint, addr)
}

/// Runs one handshake between `client` and `server`: the client dials
/// `server_addr` expecting `expected`, the server accepts one connection.
/// Returns (client side, server side).
pub(crate) async fn handshake(
    client: &TransferEndpoint,
    server: &TransferEndpoint,
    server_addr: SocketAddr,
    expected: &str,
) -> (
    Result<quinn::Connection, TransferError>,
    Result<quinn::Connection, TransferError>,
) {
    let expected = HostName::new(expected).expect("test host name");
    let accept = async {
        let incoming = server.accept().await.expect("endpoint open");
        incoming.establish().await
    };
    within(
        "handshake",
        futures::future::join(client.connect(server_addr, &expected), accept),
    )
    .await
}
