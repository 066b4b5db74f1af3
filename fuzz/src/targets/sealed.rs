//! Sealed blobs as a key holder opens them: tree blobs (restore, `ls`), and
//! the codec layer behind the AEAD tag.

use flotilla_protocol::decode;
use flotilla_protocol::repo::{BlobId, CryptoError, Tree, MAX_TREE};

use crate::common::{forge_sealed, repo_key, round_trip, self_check};

/// The bytes as a tree's plaintext, read as restore reads it (`decode` with
/// `MAX_TREE`) and as `ls` reads it (`rmp_serde::from_slice`): the same;
/// a decoded tree survives a round trip. Then the whole path: sealed by a
/// key holder, the blob opens to the same bytes under its id and under no
/// other; and the raw bytes, which nobody sealed, never open.
pub fn tree(data: &[u8]) {
    let decoded = decode::<Tree>(data, MAX_TREE).ok();
    let by_ls = rmp_serde::from_slice::<Tree>(data).ok();
    assert_eq!(
        decoded, by_ls,
        "restore and ls read the same tree differently"
    );
    if let Some(tree) = &decoded {
        round_trip(tree, |b| decode::<Tree>(b, usize::MAX));
    }

    let key = repo_key();
    let id = key.blob_id(data);
    let sealed = key
        .seal(&id, data, 3)
        .expect("a tree-sized plaintext seals");
    assert_eq!(
        key.open(&id, &sealed).as_deref(),
        Ok(data),
        "seal/open lost bytes"
    );
    let other = BlobId(*blake3::hash(data).as_bytes());
    assert!(
        other == id || key.open(&other, &sealed).is_err(),
        "opened under another id"
    );
    assert!(key.open(&id, data).is_err(), "unsealed bytes opened");
}

/// The first byte is the codec (0 raw, 1 zstd, anything else unknown), the
/// rest the payload; the harness seals them as a key holder would, under the
/// id of the payload. Raw opens to the payload; zstd reaches the bounded
/// decompressor with a hostile frame and must fail cleanly (or produce
/// plaintext of at most `MAX_TREE` bytes that hashes to the id); an unknown
/// codec is refused. Sealed metadata opens only with the raw codec.
pub fn sealed_blob(data: &[u8]) {
    self_check();
    let Some((&codec, payload)) = data.split_first() else {
        return;
    };
    let key = repo_key();
    let id = key.blob_id(payload);
    let sealed = forge_sealed(&id.0, data.to_vec());
    match (codec, key.open(&id, &sealed)) {
        (0, result) => assert_eq!(result.as_deref(), Ok(payload)),
        (1, Ok(plain)) => {
            assert!(plain.len() <= MAX_TREE);
            assert_eq!(key.blob_id(&plain), id);
        }
        (1, Err(CryptoError::Decompress(e) | CryptoError::IdMismatch(e))) => assert_eq!(e, id),
        (_, Err(CryptoError::Decompress(e))) if codec > 1 => assert_eq!(e, id),
        (c, result) => panic!("codec {c}: unexpected {result:?}"),
    }
    let context = b"flotilla snapshot fuzz";
    let meta = key.open_meta(context, &forge_sealed(context, data.to_vec()));
    assert_eq!(meta.as_deref(), (codec == 0).then_some(payload));
}
