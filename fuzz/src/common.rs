//! What the targets share: the fixed fleet, host, clock and keys every
//! verifier is given, the round-trip checks, a signer and a blob forger for
//! reaching the code behind a signature or an AEAD tag, and scratch space.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use ed25519_dalek::{Signer, SigningKey};
use flotilla_protocol::repo::{BlobId, RepoKey};
use flotilla_protocol::{
    encode, sign_task, HostName, PublicKey, SigningSeed, TaskBody, TaskKind, UnixMillis,
    TASK_VERSION,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::Serialize;

/// The fleet every verifier belongs to.
pub const FLEET: &str = "f1";
/// The host every verifier runs on.
pub const HOST: &str = "nas";
/// The verifier's clock (the protocol crate's tests use the same instant).
pub const NOW: UnixMillis = 1_700_000_000_000;
/// `flotilla_protocol`'s `CLOCK_SKEW_MS` (pub in `task.rs`, but not
/// re-exported by `lib.rs`, so copied; `task_body` fails loudly if it drifts).
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// The coordinator's signing seed in this harness.
pub const SEED: [u8; 32] = [7; 32];
/// The repository master key in this harness.
pub const MASTER: [u8; 32] = [1; 32];
/// The storage agent's limit on a `hello` frame (`HELLO_BYTES`, private in
/// agent/src/transfer/server.rs).
pub const HELLO_BYTES: usize = flotilla_protocol::limits::TASK_BYTES + 1024;
/// The coordinator's limit on a repository query reply
/// (coordinator/src/fleetops.rs, `query`).
pub const REPO_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// `FleetStatus::decode`'s limit.
pub const STATUS_BYTES: usize = 8 * 1024 * 1024;
/// A snapshot id (32 lowercase hex digits) the disk targets write under.
pub const SNAPSHOT_ID: &str = "00112233445566778899aabbccddeeff";

/// Domain separation of task signatures (`SIGNING_CONTEXT`, private in
/// protocol/src/task.rs). [`self_check`] proves the copy is current.
const TASK_SIGNING_CONTEXT: &[u8] = b"flotilla-task-v1\0";
/// The blob encryption key's derivation context (protocol/src/repo.rs).
const ENC_KEY_CONTEXT: &str = "flotilla 2026 blob encryption v1";
/// Seal format version byte (protocol/src/repo.rs `SEAL_VERSION`).
const SEAL_VERSION: u8 = 1;

/// This verifier's host name.
pub fn host() -> &'static HostName {
    static H: LazyLock<HostName> = LazyLock::new(|| HostName::new(HOST).expect("a valid name"));
    &H
}

/// The coordinator's public key, matching [`SEED`].
pub fn public_key() -> &'static PublicKey {
    static K: LazyLock<PublicKey> = LazyLock::new(|| SigningSeed(SEED).public_key());
    &K
}

/// The repository key, from [`MASTER`].
pub fn repo_key() -> &'static RepoKey {
    static K: LazyLock<RepoKey> = LazyLock::new(|| RepoKey::from_master(&MASTER));
    &K
}

static SIGNER: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&SEED));

/// Signs `body` exactly as the coordinator signs task bodies, so a target
/// can put any bytes behind a valid signature and reach the body decoder and
/// the fleet, host and time checks.
pub fn sign_task_bytes(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(TASK_SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(TASK_SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    SIGNER.sign(&msg).to_bytes().to_vec()
}

static FORGER: LazyLock<LessSafeKey> = LazyLock::new(|| {
    let enc = blake3::derive_key(ENC_KEY_CONTEXT, &MASTER);
    let unbound = UnboundKey::new(&AES_256_GCM, &enc).expect("a 32-byte AES key");
    LessSafeKey::new(unbound)
});

/// Seals `body` (codec byte, then payload) under `aad` as `RepoKey` does,
/// but with the codec byte and payload chosen by the fuzzer: the only way to
/// reach the decompressor and the codec dispatch behind the AEAD tag. A
/// storage host cannot do this (it holds no key); a key holder can.
pub fn forge_sealed(aad: &[u8], mut body: Vec<u8>) -> Vec<u8> {
    let nonce = [0u8; 12];
    FORGER
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .expect("AES-GCM seals");
    let mut out = Vec::with_capacity(1 + nonce.len() + body.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    out
}

/// Fails loudly when a copy above no longer matches the protocol crate, so a
/// stale harness cannot silently stop reaching the code behind signatures
/// and tags. Cheap; the targets that rely on the copies call it once.
pub fn self_check() {
    static DONE: LazyLock<()> = LazyLock::new(|| {
        let body = TaskBody {
            v: TASK_VERSION,
            id: "self-check".parse().expect("a valid task id"),
            fleet: FLEET.into(),
            host: host().clone(),
            issued_at: NOW,
            expires_at: NOW + 60_000,
            kind: TaskKind::Check { read_data: false },
            epoch: None,
        };
        let env = sign_task(&SigningSeed(SEED), &body).expect("signs");
        assert_eq!(
            env.signature,
            sign_task_bytes(&env.body),
            "fuzz/src/common.rs: TASK_SIGNING_CONTEXT no longer matches protocol/src/task.rs"
        );
        let plain = b"self-check".to_vec();
        let id = repo_key().blob_id(&plain);
        let mut body = vec![0u8];
        body.extend_from_slice(&plain);
        assert_eq!(
            repo_key().open(&id, &forge_sealed(&id.0, body)),
            Ok(plain),
            "fuzz/src/common.rs: the forged seal format no longer matches protocol/src/repo.rs"
        );
    });
    LazyLock::force(&DONE);
}

/// A blob id no input names.
pub const OTHER_ID: BlobId = BlobId([0xab; 32]);

/// Encoding is stable across a round trip: a decoded value encodes, that
/// encoding decodes, and the result encodes to the same bytes. Returns the
/// value decoded again. `decode` should not impose a size limit (a value
/// re-encoded with field names can be larger than a positional input).
/// For types with floats (a NaN is not equal to itself) this is the check.
pub fn reencode<T, E>(value: &T, decode: impl Fn(&[u8]) -> Result<T, E>) -> T
where
    T: Serialize,
    E: Debug,
{
    let once = encode(value).expect("a decoded value must encode");
    let back = decode(&once).unwrap_or_else(|e| panic!("its encoding does not decode: {e:?}"));
    let twice = encode(&back).expect("a decoded value must encode");
    assert!(
        once == twice,
        "encoding changed across a round trip:\n{once:02x?}\n{twice:02x?}"
    );
    back
}

/// [`reencode`], and the value decoded again equals the value.
pub fn round_trip<T, E>(value: &T, decode: impl Fn(&[u8]) -> Result<T, E>)
where
    T: Serialize + PartialEq + Debug,
    E: Debug,
{
    let back = reencode(value, decode);
    assert_eq!(&back, value, "value changed across a round trip");
}

/// Where the disk targets put their files: `$FLOTILLA_FUZZ_TMP` (run.sh sets
/// it and removes it afterwards), else /dev/shm, else the temp directory.
/// One directory per process, so parallel fuzzers do not collide.
pub fn scratch() -> &'static Path {
    static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
        let base = std::env::var_os("FLOTILLA_FUZZ_TMP")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("flotilla-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
        dir
    });
    &DIR
}

/// Removes this process's scratch directory (the replay test calls it; a
/// fuzzer process leaves it to run.sh).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// Lowercase hex of 32 bytes, as the repository names packs.
pub fn hex32(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}
