//! The daemon's `flotilla-status` value, as `flotilla status` reads it.

use flotilla_protocol::decode;
use flotilla_protocol::status::{FleetStatus, STATUS_VERSION};

use crate::common::round_trip;

/// Decodes the fleet status; a decoded one has a version this build reads
/// and survives a round trip.
pub fn fleet_status(data: &[u8]) {
    let Ok(status) = FleetStatus::decode(data) else {
        return;
    };
    assert!(
        status.v >= 1 && status.v <= STATUS_VERSION,
        "version {}",
        status.v
    );
    round_trip(&status, |b| decode::<FleetStatus>(b, usize::MAX));
}
