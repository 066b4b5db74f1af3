//! Signed tasks: the envelope as it arrives on `flotilla.task.<host>` (and in
//! a data-plane `hello`), and the signed body behind a valid signature.

use flotilla_protocol::limits::TASK_BYTES;
use flotilla_protocol::{
    decode, encode, verify_task, verify_task_for_peer, DecodeError, TaskBody, TaskEnvelope,
    TaskVerifyError, TASK_VERSION,
};

use crate::common::{
    host, public_key, round_trip, self_check, sign_task_bytes, CLOCK_SKEW_MS, FLEET, NOW,
};

/// Raw bytes from the bus, as the agent's intake and the storage agent's
/// `hello` verify them. Nothing the fuzzer makes carries the coordinator's
/// signature, so every input must be refused before its body is trusted,
/// with a reason and without a task id.
pub fn task_envelope(data: &[u8]) {
    let key = public_key();
    let results = [
        verify_task(data, key, FLEET, host(), NOW),
        verify_task_for_peer(data, key, FLEET, NOW),
    ];
    for result in results {
        match result {
            Ok(body) => {
                // Only possible for bytes signed with the harness's seed (a
                // hand-made seed, say): then the body is the signed body.
                let env: TaskEnvelope =
                    decode(data, TASK_BYTES).expect("a verified envelope decodes");
                assert_eq!(env.signature, sign_task_bytes(&env.body));
                assert_eq!(decode::<TaskBody>(&env.body, TASK_BYTES).ok(), Some(body));
            }
            Err(e) => {
                let _ = (e.reason(), e.to_string());
                if !matches!(
                    e,
                    TaskVerifyError::Envelope(_)
                        | TaskVerifyError::Unsigned
                        | TaskVerifyError::BadSignature
                ) {
                    // Past the signature: the harness's seed signed it.
                    let env: TaskEnvelope =
                        decode(data, TASK_BYTES).expect("a signed envelope decodes");
                    assert_eq!(env.signature, sign_task_bytes(&env.body), "{e:?}");
                } else {
                    assert!(e.task_id().is_none(), "an unverified task has an id: {e:?}");
                }
            }
        }
    }
    if let Ok(env) = decode::<TaskEnvelope>(data, TASK_BYTES) {
        round_trip(&env, |b| decode::<TaskEnvelope>(b, usize::MAX));
    }
}

/// Any bytes as a task body, signed with the coordinator's key: reaches the
/// body decoder and the version, fleet, host and time checks. The verdict
/// must be exactly what the decoded body's fields call for, and an accepted
/// task must be the body that was signed.
pub fn task_body(data: &[u8]) {
    self_check();
    let Ok(body) = decode::<TaskBody>(data, TASK_BYTES) else {
        // verify_task would decode the same bytes with the same limit and
        // refuse them as `Body(..)`; not worth a signature per input.
        return;
    };
    round_trip(&body, |b| decode::<TaskBody>(b, usize::MAX));

    let env = TaskEnvelope {
        v: TASK_VERSION,
        body: data.to_vec(),
        signature: sign_task_bytes(data),
    };
    let bytes = encode(&env).expect("an envelope encodes");
    if bytes.len() > TASK_BYTES {
        return;
    }
    let version_ok = body.v >= 1 && body.v <= TASK_VERSION;
    let fleet_ok = body.fleet == FLEET;
    let host_ok = &body.host == host();
    let expired = NOW > body.expires_at.saturating_add(CLOCK_SKEW_MS);
    let early = body.issued_at > NOW.saturating_add(CLOCK_SKEW_MS);
    let peer_ok = version_ok && fleet_ok && !expired && !early;

    let key = public_key();
    let peer = verify_task_for_peer(&bytes, key, FLEET, NOW);
    let full = verify_task(&bytes, key, FLEET, host(), NOW);
    for (result, should_pass, checks_host) in
        [(peer, peer_ok, false), (full, peer_ok && host_ok, true)]
    {
        match result {
            Ok(got) => {
                assert!(should_pass, "accepted a task its fields refuse: {got:?}");
                assert_eq!(got, body, "accepted a task other than the one signed");
            }
            Err(e) => {
                assert!(!should_pass, "refused a valid task: {e:?}\n{body:?}");
                let _ = (e.reason(), e.to_string());
                match &e {
                    TaskVerifyError::Body(DecodeError::UnsupportedVersion { found, .. }) => {
                        assert!(!version_ok);
                        assert_eq!(*found, body.v);
                    }
                    TaskVerifyError::WrongFleet { found, .. } => {
                        assert!(!fleet_ok);
                        assert_eq!(found, &body.fleet);
                    }
                    TaskVerifyError::WrongHost { found, .. } => {
                        assert!(checks_host && !host_ok, "{e:?}");
                        assert_eq!(found, body.host.as_str());
                    }
                    TaskVerifyError::Expired { expires_at, .. } => {
                        assert!(expired, "{e:?}");
                        assert_eq!(*expires_at, body.expires_at);
                    }
                    TaskVerifyError::NotYetValid { issued_at, .. } => {
                        assert!(early, "{e:?}");
                        assert_eq!(*issued_at, body.issued_at);
                    }
                    other => panic!("a signed, decodable body refused as {other:?}"),
                }
                // Past the signature, the refusal names the task.
                if !matches!(e, TaskVerifyError::Body(_)) {
                    let named = e.task_id().map(|t| t.to_string());
                    assert_eq!(named, Some(body.id.to_string()));
                }
            }
        }
    }
}
