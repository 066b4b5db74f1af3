//! Snapshot records (a `.snap` file, a `Commit` or `Snapshot` frame, a query
//! reply) and the sealed `SnapshotMeta` inside them.

use flotilla_protocol::decode;
use flotilla_protocol::frame::MAX_FRAME;
use flotilla_protocol::repo::{BlobId, SnapshotMeta, SnapshotRecord, REPO_FORMAT};

use crate::common::{host, repo_key, round_trip, NOW, SNAPSHOT_ID};

/// Two readings of the same bytes:
///
/// 1. a record, with the storage agent's limit (`MAX_SNAPSHOT_BYTES` =
///    `MAX_FRAME`): it survives a round trip; its meta, sealed by nobody,
///    does not verify; resealed by a key holder to match, it verifies, and
///    moving its time or its id breaks that;
/// 2. the plaintext of a sealed meta: `open_meta` yields exactly what
///    `rmp_serde` makes of it, and `verify` accepts it exactly when its
///    tree, host and time are the record's.
pub fn snapshot_record(data: &[u8]) {
    let key = repo_key();
    if let Ok(rec) = decode::<SnapshotRecord>(data, MAX_FRAME) {
        round_trip(&rec, |b| decode::<SnapshotRecord>(b, usize::MAX));
        assert!(rec.verify(key).is_err(), "an unsealed record verified");

        let meta = SnapshotMeta {
            v: REPO_FORMAT,
            paths: vec!["/srv".into()],
            excludes: Vec::new(),
            task_id: "fuzz".parse().expect("a valid task id"),
            summary: Default::default(),
            unreadable: Vec::new(),
            tree: Some(rec.tree),
            host: Some(rec.host.to_string()),
            time: Some(rec.time),
        };
        let plain = flotilla_protocol::encode(&meta).expect("meta encodes");
        let mut good = rec.clone();
        good.meta = key
            .seal_meta(&SnapshotRecord::meta_context(&rec.id), &plain)
            .expect("meta seals");
        assert_eq!(good.verify(key).as_ref(), Ok(&meta));
        let mut moved = good.clone();
        moved.time = moved.time.wrapping_add(1);
        assert!(moved.verify(key).is_err(), "a moved record verified");
        let mut renamed = good.clone();
        renamed.id.push('0');
        assert!(renamed.verify(key).is_err(), "a renamed record verified");
    }

    let rec = SnapshotRecord {
        v: REPO_FORMAT,
        id: SNAPSHOT_ID.into(),
        host: host().clone(),
        time: NOW,
        tree: BlobId([1; 32]),
        partial: false,
        blobs: Vec::new(),
        meta: key
            .seal_meta(&SnapshotRecord::meta_context(SNAPSHOT_ID), data)
            .expect("meta seals"),
    };
    let expected = rmp_serde::from_slice::<SnapshotMeta>(data).ok();
    assert_eq!(rec.open_meta(key), expected);
    let matches = expected.as_ref().is_some_and(|m| {
        m.tree == Some(rec.tree)
            && m.host.as_deref() == Some(rec.host.as_str())
            && m.time == Some(rec.time)
    });
    match rec.verify(key) {
        Ok(m) => {
            assert!(matches, "verified a meta that does not match: {m:?}");
            assert_eq!(Some(m), expected);
        }
        Err(why) => assert!(!matches, "refused a matching meta: {why}"),
    }
    if let Some(m) = &expected {
        round_trip(m, |b| rmp_serde::from_slice::<SnapshotMeta>(b));
    }
}
