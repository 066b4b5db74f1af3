//! The QUIC data plane, whole: how agents reach each other to move file
//! data, the client side of a session and the storage side.
//!
//! Every agent binds one UDP socket ([`TransferEndpoint`]) that both accepts
//! connections from peers and opens connections to them. Both directions use
//! mutual TLS 1.3 under the fleet CA from the enrollment bundle ([`Identity`]),
//! with ALPN [`flotilla_protocol::transfer::ALPN`]:
//!
//! - the **client** checks in the handshake that the server's certificate is
//!   issued by the fleet CA *and* names the host it meant to reach, so a
//!   mis-advertised address fails with "peer at ADDR is not host X";
//! - the **server** checks in the handshake that the client's certificate is
//!   issued by the fleet CA (anything else is refused before a stream opens),
//!   and afterwards, once it knows which host it expects (from the signed task
//!   the client presents), calls [`peer_host`].
//!
//! Streams carry length-prefixed MessagePack frames ([`write_frame`],
//! [`read_frame`]); their meaning is in [`flotilla_protocol::frame`].
//!
//! ```no_run
//! use flotilla_agent::{Identity, TransferEndpoint};
//! use flotilla_protocol::HostName;
//!
//! # async fn demo(bundle: flotilla_protocol::Bundle) -> anyhow::Result<()> {
//! let identity = Identity::from_bundle(&bundle)?;
//! let endpoint = TransferEndpoint::bind("0.0.0.0:7443".parse()?, &identity)?;
//! let nas = HostName::new("nas")?;
//! // The handshake has checked that the peer's certificate names `nas`.
//! let conn = endpoint.connect("192.0.2.10:7443".parse()?, &nas).await?;
//! let (mut send, _recv) = conn.open_bi().await?;
//! send.write_all(b"hello").await?;
//! send.finish()?;
//! # Ok(())
//! # }
//! ```
//!
//! Layout: `tls` (identity, rustls and transport configuration, peer checks),
//! `endpoint` (socket, connect, accept), `frame` (framing), `error` (errors and
//! their retry classification); `client` (a session as the source or
//! destination opens it: [`client::Session`], upload lanes, fetch streams, and
//! the blocking `Store`/`Fetch` adapters the engines use); `server` (the
//! storage side: hello verification, per-session grants, upload and fetch
//! streams, given a narrow [`server::ServerContext`]); `claims` ([`Claims`]:
//! which live session uploads or relies on which blob, for dedup across
//! sessions and for prune); `pace` (the smooth rate limit of a copy over a
//! slow link). `testing` is a test CA.
//!
//! This module knows nothing of the task journal or the job runners (`jobs`
//! uses it, never the other way round) and never holds a repository key.

mod claims;
pub(crate) mod client;
mod endpoint;
mod error;
mod frame;
pub(crate) mod pace;
pub(crate) mod server;
#[cfg(test)]
mod testing;
mod tls;

pub(crate) use claims::Claims;

pub use endpoint::{
    advertised_addr, route_ip_to, AdvertisedFrom, IncomingConnection, TransferEndpoint,
};
pub use error::TransferError;
pub use frame::{read_frame, write_frame};
pub use tls::{nats_tls_config, peer_host, Identity, RevokedCerts};
