//! Socket addresses on the wire: the `"ip:port"` string (`"[::1]:7443"` for
//! IPv6), as the `String` fields they replaced carried them.
//!
//! serde's own `SocketAddr` impl writes a string only for human-readable
//! formats; MessagePack is not one, and it would write an enum of byte arrays
//! instead. These helpers (`#[serde(with = "crate::addr")]`) keep the string.
//! An address that does not parse fails the decoding of the whole message,
//! so a task naming one is refused as malformed.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes `addr` as its `Display` string.
pub(crate) fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(addr)
}

/// Reads an `"ip:port"` string.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text: String = Deserialize::deserialize(d)?;
    parse(&text)
}

fn parse<E: serde::de::Error>(text: &str) -> Result<SocketAddr, E> {
    text.parse().map_err(|_| {
        E::custom(format_args!(
            "address {:?} is not IP:PORT",
            text.chars().take(80).collect::<String>()
        ))
    })
}

/// The same for an optional address (nil on the wire when absent).
pub(crate) mod option {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        addr: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(a) => s.collect_str(a),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text: Option<String> = Deserialize::deserialize(d)?;
        text.as_deref().map(parse).transpose()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{codec, encode};

    /// What the fields looked like before they were typed.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Old {
        addr: String,
        maybe: Option<String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct New {
        #[serde(with = "crate::addr")]
        addr: SocketAddr,
        #[serde(with = "crate::addr::option")]
        maybe: Option<SocketAddr>,
    }

    #[test]
    fn the_old_string_form_decodes_and_encodes_back_unchanged() {
        for (addr, maybe) in [
            ("192.0.2.1:7443", Some("10.0.0.2:1")),
            ("[2001:db8::1]:7443", None),
            ("[::1]:9", Some("[fe80::1]:65535")),
        ] {
            let old = Old {
                addr: addr.into(),
                maybe: maybe.map(Into::into),
            };
            let bytes = encode(&old).expect("encodes");
            let new: New = codec::decode(&bytes, 1024).expect("decodes");
            assert_eq!(new.addr, addr.parse::<SocketAddr>().expect("valid"));
            assert_eq!(new.maybe.map(|a| a.to_string()).as_deref(), maybe);
            // Back to the very same bytes, readable by an older peer.
            assert_eq!(encode(&new).expect("encodes"), bytes);
            let again: Old = codec::decode(&bytes, 1024).expect("decodes");
            assert_eq!(again, old);
        }
    }

    proptest::proptest! {
        /// Any address a peer can name comes back the same (the wire's
        /// string is canonical after one encoding, as decoders re-encode).
        #[test]
        fn every_address_round_trips(ip in proptest::prelude::any::<std::net::IpAddr>(), port: u16, scope: u32) {
            let mut addr = SocketAddr::new(ip, port);
            if let SocketAddr::V6(v6) = &mut addr {
                v6.set_scope_id(scope);
            }
            let new = New { addr, maybe: Some(addr) };
            let bytes = encode(&new).expect("encodes");
            let back: New = codec::decode(&bytes, 1024).expect("decodes");
            proptest::prop_assert_eq!(&back, &new);
            proptest::prop_assert_eq!(encode(&back).expect("encodes"), bytes);
        }
    }

    #[test]
    fn an_unparsable_address_fails_decoding_cleanly() {
        for bad in ["nas:7443", "192.0.2.1", "", "192.0.2.1:99999", "[::1]"] {
            let bytes = encode(&Old {
                addr: bad.into(),
                maybe: None,
            })
            .expect("encodes");
            let err = codec::decode::<New>(&bytes, 1024).expect_err(bad);
            assert!(err.to_string().contains("is not IP:PORT"), "{err}");
            let bytes = encode(&Old {
                addr: "192.0.2.1:1".into(),
                maybe: Some(bad.into()),
            })
            .expect("encodes");
            assert!(codec::decode::<New>(&bytes, 1024).is_err(), "{bad:?}");
        }
    }
}
