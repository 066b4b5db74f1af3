//! The QUIC data plane: how agents reach each other to move file data.
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
//! use flotilla_agent::{read_frame, write_frame, Identity, TransferEndpoint};
//! use flotilla_protocol::HostName;
//!
//! # async fn demo(bundle: flotilla_protocol::Bundle) -> anyhow::Result<()> {
//! let identity = Identity::from_bundle(&bundle)?;
//! let endpoint = TransferEndpoint::bind("0.0.0.0:7443".parse()?, &identity)?;
//! let nas = HostName::new("nas")?;
//! let conn = endpoint.connect("192.0.2.10:7443".parse()?, &nas).await?;
//! let (mut send, mut recv) = conn.open_bi().await?;
//! write_frame(&mut send, "hello").await?;
//! send.finish()?;
//! let reply: Option<String> = read_frame(&mut recv, 1024).await?;
//! println!("{reply:?}");
//! # Ok(())
//! # }
//! ```
//!
//! Layout: `tls` (identity, rustls and transport configuration, peer checks),
//! `endpoint` (socket, connect, accept), `frame` (framing), `error`
//! (errors and their retry classification).

mod endpoint;
mod error;
mod frame;
#[cfg(test)]
mod testing;
mod tls;

pub use endpoint::{IncomingConnection, TransferEndpoint, HANDSHAKE_TIMEOUT};
pub use error::TransferError;
pub use frame::{read_frame, read_frame_bytes, write_frame};
pub use tls::{peer_host, transport_config, Identity};
