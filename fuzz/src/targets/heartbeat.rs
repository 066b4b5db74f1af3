//! Heartbeats from the `flotilla-health` bucket (`Heartbeat::decode`, as the
//! coordinator's registry and `hosts` read them).

use flotilla_protocol::{decode, Heartbeat, HEARTBEAT_VERSION};

use crate::common::reencode;

/// Decodes a heartbeat; a decoded one has a version this build reads and
/// encodes to bytes that decode to the same encoding. (Values are compared
/// by encoding: the load averages are floats, and a NaN is not equal to
/// itself.)
pub fn heartbeat(data: &[u8]) {
    let Ok(hb) = Heartbeat::decode(data) else {
        return;
    };
    assert!(hb.v >= 1 && hb.v <= HEARTBEAT_VERSION, "version {}", hb.v);
    let back = reencode(&hb, |b| decode::<Heartbeat>(b, usize::MAX));
    assert_eq!(back.host, hb.host);
    assert_eq!(back.roots, hb.roots);
    assert_eq!(back.running, hb.running);
}
