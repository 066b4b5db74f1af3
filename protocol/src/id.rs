//! Ids of tasks and snapshots.
//!
//! Both are strings on the wire (`#[serde(transparent)]`: the bytes are those
//! of the plain string they replaced) and typed in code, so a task id is never
//! passed where a snapshot id is meant. Decoding does not check them: a task
//! body is signed by the coordinator, an event is informational, and the
//! repository checks every snapshot id before it becomes a file name. Ids that
//! come from people or from peers as loose strings go through
//! [`TaskId::new`] / [`SnapshotId::new`] (or `parse`), which bound their length
//! and characters.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest task id [`TaskId::new`] accepts (a UUID is 36 characters).
const MAX_TASK_ID: usize = 64;
/// Length of a snapshot id: 32 lowercase hex digits.
const SNAPSHOT_ID_LEN: usize = 32;

/// Why a string is not a valid [`TaskId`] or [`SnapshotId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {why}")]
pub struct IdError {
    /// `task id` or `snapshot id`.
    pub what: &'static str,
    /// The rejected input, truncated to 80 characters.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl IdError {
    fn new(what: &'static str, input: &str, why: &'static str) -> Self {
        Self {
            what,
            input: input.chars().take(80).collect(),
            why,
        }
    }
}

/// The id of one task: a UUID when the coordinator made it. Tasks are
/// idempotent by id, and the agent's journal is keyed by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// Checks `id`: 1 to 64 ASCII letters, digits, `-` or `_`.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let err = |why| IdError::new("task id", &id, why);
        if id.is_empty() {
            return Err(err("it is empty"));
        }
        if id.len() > MAX_TASK_ID {
            return Err(err("it is longer than 64 characters"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err("use only letters, digits, '-' and '_'"));
        }
        Ok(Self(id))
    }

    /// A fresh random id (a hyphenated UUID v4), as the coordinator gives
    /// every task it signs.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The id of one snapshot: 32 lowercase hex digits, made by the source that
/// backs up. It names the snapshot's file in the repository.
///
/// What a person types to name a snapshot is a *prefix* and stays a string;
/// only the full id is a `SnapshotId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// Checks `id`: exactly 32 lowercase hex digits, as the repository
    /// requires of a snapshot's file name.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let err = |why| IdError::new("snapshot id", &id, why);
        if id.len() != SNAPSHOT_ID_LEN {
            return Err(err("a snapshot id is 32 hex digits"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("use only 0-9 and a-f"));
        }
        Ok(Self(id))
    }

    /// A fresh random id (a UUID v4 as 32 hex digits), as a source gives each
    /// snapshot it commits.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `Display`, `FromStr`, `AsRef<str>`, `Borrow<str>` (maps keyed by an id can
/// be looked up with a `&str`), comparison with strings, and the way back to
/// a `String`: the same for both ids.
macro_rules! string_id {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$t> for String {
            fn from(value: $t) -> Self {
                value.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Sound: `Hash`, `Eq` and `Ord` are derived from the one `String`
        // field, so they agree with `str`'s.
        impl Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $t {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id!(TaskId);
string_id!(SnapshotId);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{codec, encode};

    #[test]
    fn ids_are_the_plain_string_on_the_wire() {
        let task = TaskId::random();
        let snap = SnapshotId::random();
        // Byte for byte what the `String` fields they replaced encoded to.
        assert_eq!(
            encode(&task).expect("encodes"),
            encode(task.as_str()).expect("encodes")
        );
        assert_eq!(
            encode(&snap).expect("encodes"),
            encode(snap.as_str()).expect("encodes")
        );
        // And a string written by an older peer reads back as the id.
        let old = encode("0b7e4a9e-5d3c-4c1e-9a57-2f8d1e6b3c10").expect("encodes");
        let back: TaskId = codec::decode(&old, 1024).expect("decodes");
        assert_eq!(back, "0b7e4a9e-5d3c-4c1e-9a57-2f8d1e6b3c10");
        let old = encode(&"ab".repeat(16)).expect("encodes");
        let back: SnapshotId = codec::decode(&old, 1024).expect("decodes");
        assert_eq!(back.as_str(), "ab".repeat(16));
        // JSON (the CLI's `--json`) sees a plain string too.
        assert_eq!(
            serde_json::to_string(&snap).expect("json"),
            format!("\"{snap}\"")
        );
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let (a, b) = (TaskId::random(), TaskId::random());
        assert_ne!(a, b);
        assert_eq!(TaskId::new(a.as_str()), Ok(a.clone()));
        assert_eq!(a.as_str().len(), 36);
        let s = SnapshotId::random();
        assert_eq!(s.as_str().parse::<SnapshotId>(), Ok(s.clone()));
        assert_ne!(s, SnapshotId::random());
    }

    #[test]
    fn malformed_task_ids_are_refused() {
        for ok in ["t-1", "t", "A_b-9", &"x".repeat(64)] {
            assert!(TaskId::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a.b", "a b", "../x", "t\n", "é", &"x".repeat(65)] {
            let err = TaskId::new(bad).expect_err(bad);
            assert_eq!(err.what, "task id");
            assert!(err.input.chars().count() <= 80);
        }
    }

    #[test]
    fn malformed_snapshot_ids_are_refused() {
        assert!(SnapshotId::new("0123456789abcdef".repeat(2)).is_ok());
        for bad in [
            String::new(),
            "abc".into(),
            "0123456789ABCDEF".repeat(2),
            "g".repeat(32),
            "a".repeat(33),
            format!("../{}", "a".repeat(29)),
        ] {
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maps_keyed_by_an_id_are_looked_up_by_str() {
        let id = TaskId::new("t-1").expect("valid");
        let map = HashMap::from([(id.clone(), 1)]);
        assert_eq!(map.get("t-1"), Some(&1));
        assert_eq!(id.to_string(), "t-1");
        assert_eq!(String::from(id), "t-1");
    }
}
