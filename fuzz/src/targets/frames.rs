//! Data-plane frame bodies (protocol/src/frame.rs) with the limits their
//! readers use, and the replies to the read-only repository queries.
//!
//! The QUIC reader itself (agent/src/transfer/frame.rs `read_frame`) reads
//! from a `quinn::RecvStream` and is private to the agent; what it does with
//! a body after the length prefix is exactly `flotilla_protocol::decode` with
//! the limit below, which is what these targets fuzz.

use flotilla_protocol::frame::{RepoReply, Request, Response, MAX_FRAME};
use flotilla_protocol::{decode, verify_task_for_peer};

use crate::common::{
    public_key, repo_key, round_trip, FLEET, HELLO_BYTES, NOW, OTHER_ID, REPO_REPLY_BYTES,
};

/// A frame a client sends a storage agent: the `hello` (limit
/// `HELLO_BYTES`) and every later request (limit `MAX_FRAME`), then what
/// is done first with each: the server verifies a hello's task; a key holder
/// must never accept a peer's unsealed blob or snapshot.
pub fn frame_request(data: &[u8]) {
    let hello = decode::<Request>(data, HELLO_BYTES).ok();
    let Ok(req) = decode::<Request>(data, MAX_FRAME) else {
        assert!(
            hello.is_none(),
            "the smaller limit accepted what the larger refused"
        );
        return;
    };
    if let Some(h) = &hello {
        assert_eq!(h, &req);
    }
    round_trip(&req, |b| decode::<Request>(b, usize::MAX));
    match &req {
        Request::Hello { task, .. } => {
            // The server's first step; nothing here is signed by the fleet.
            let verdict = verify_task_for_peer(task, public_key(), FLEET, NOW);
            if let Err(e) = verdict {
                let _ = (e.reason(), e.task_id(), e.to_string());
            }
        }
        Request::Commit { snapshot } => {
            // A storage host cannot check the seal, but a key holder reading
            // the record later must refuse it.
            assert!(snapshot.verify(repo_key()).is_err());
        }
        Request::Put { id, data, .. } => {
            assert!(repo_key().open(id, data).is_err(), "a peer's bytes opened");
        }
        _ => {}
    }
}

/// A frame a storage agent sends back to a source or destination.
pub fn frame_response(data: &[u8]) {
    let Ok(resp) = decode::<Response>(data, MAX_FRAME) else {
        return;
    };
    round_trip(&resp, |b| decode::<Response>(b, usize::MAX));
    match &resp {
        // The destination opens what it fetched; only authentic blobs open.
        Response::Blob { id, data, .. } => {
            assert!(repo_key().open(id, data).is_err(), "a peer's bytes opened")
        }
        Response::Snapshot { snapshot } => assert!(snapshot.verify(repo_key()).is_err()),
        _ => {}
    }
}

/// A reply to `flotilla.repo.<storage>.*`, with the coordinator's limit, and
/// what the coordinator does with it: open each record's meta, open a tree.
pub fn repo_reply(data: &[u8]) {
    let Ok(reply) = decode::<RepoReply>(data, REPO_REPLY_BYTES) else {
        return;
    };
    round_trip(&reply, |b| decode::<RepoReply>(b, usize::MAX));
    let key = repo_key();
    match &reply {
        RepoReply::Snapshots { snapshots } => {
            for rec in snapshots {
                assert!(rec.open_meta(key).is_none(), "unsealed meta opened");
                assert!(rec.verify(key).is_err());
            }
        }
        RepoReply::Tree { data } => {
            assert!(key.open(&OTHER_ID, data).is_err(), "unsealed tree opened")
        }
        _ => {}
    }
}
