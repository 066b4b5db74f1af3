//! The fleet key file (`keyfile::open`): read from a user's disk by
//! `flotilla key import` and `flotilla-agent recover`.

use flotilla_protocol::keyfile::{self, KdfParams, KeyFileError};

/// The passphrase the seeds were sealed with.
pub const PASSPHRASE: &[u8] = b"fuzzing passphrase";

/// Opens the bytes as a key file. One that opens holds a body that
/// validates, seals again (cheapest parameters) to a file that opens to the
/// same body, and that file refuses another passphrase.
pub fn keyfile(data: &[u8]) {
    let Ok(body) = keyfile::open(data, PASSPHRASE) else {
        return;
    };
    body.validate()
        .unwrap_or_else(|e| panic!("an opened key file does not validate: {e}"));
    let cheap = KdfParams {
        m_kib: KdfParams::MIN_M_KIB,
        t: 1,
        p: 1,
    };
    let again = keyfile::seal(&body, PASSPHRASE, cheap, [1; 16], [2; 12])
        .unwrap_or_else(|e| panic!("an opened key file does not seal again: {e}"));
    let back = keyfile::open(&again, PASSPHRASE)
        .unwrap_or_else(|e| panic!("a resealed key file does not open: {e}"));
    assert!(back == body, "the body changed across a seal and open");
    assert_eq!(
        keyfile::open(&again, b"another passphrase"),
        Err(KeyFileError::WrongPassphrase)
    );
}
