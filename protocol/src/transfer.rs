//! Names of the QUIC data plane between agents.
//!
//! Agents move file data to each other over QUIC with mutual TLS: both sides
//! present a host certificate issued by the fleet CA (from their enrollment
//! [`crate::Bundle`]), and each checks that the other is the host it expected.
//! The frames carried on the streams are in [`crate::frame`].

/// ALPN protocol id every data-plane connection negotiates.
///
/// The trailing number is the data-plane major version: a change that an older
/// agent cannot understand gets a new ALPN (`flotilla/2`), so two mismatched
/// agents fail in the TLS handshake with a clear alert instead of
/// misreading each other's frames. A server may offer several versions while a
/// fleet upgrades.
pub const ALPN: &[u8] = b"flotilla/1";
