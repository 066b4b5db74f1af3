//! Events from the `FLOTILLA_EVENTS` stream (`Event::decode`, as `serve`,
//! `events`, `status` and `--wait` read them).

use flotilla_protocol::{decode, Event, EventBody, EVENT_VERSION};

use crate::common::round_trip;

/// Decodes an event; a decoded one has a version this build reads, a kind
/// listed in `EventBody::KINDS` and a subject, and survives a round trip.
pub fn event(data: &[u8]) {
    let Ok(ev) = Event::decode(data) else {
        return;
    };
    assert!(ev.v >= 1 && ev.v <= EVENT_VERSION, "version {}", ev.v);
    assert!(
        EventBody::KINDS.contains(&ev.body.kind()),
        "kind {} is not in EventBody::KINDS",
        ev.body.kind()
    );
    let subject = ev.subject();
    assert!(subject.ends_with(ev.host.as_str()), "{subject}");
    let _ = ev.body.task_id();
    round_trip(&ev, |b| decode::<Event>(b, usize::MAX));
}
