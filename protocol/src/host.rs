//! Host names, which double as NATS subject tokens and certificate names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The name of one host in the fleet.
///
/// It is a single NATS subject token and a DNS label (it names the host in its
/// certificate) at once, so it is limited to lowercase ASCII letters, digits and
/// `-`, 1 to 63 characters, starting with a letter and not ending with `-`.
/// Dots are not allowed: they separate subject tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

/// Why a string is not a valid [`HostName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host name {name:?}: {why} (use 1-63 of a-z, 0-9 and '-', starting with a letter)")]
pub struct HostNameError {
    /// The rejected input, truncated to 80 characters.
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl HostName {
    /// Validates `name` as a host name.
    pub fn new(name: impl Into<String>) -> Result<Self, HostNameError> {
        let name = name.into();
        let err = |why| HostNameError {
            name: name.chars().take(80).collect(),
            why,
        };
        if name.is_empty() {
            return Err(err("it is empty"));
        }
        if name.len() > 63 {
            return Err(err("it is longer than 63 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(err("it contains a character other than a-z, 0-9 and '-'"));
        }
        if !name.as_bytes()[0].is_ascii_lowercase() {
            return Err(err("it does not start with a letter"));
        }
        if name.ends_with('-') {
            return Err(err("it ends with '-'"));
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostName {
    type Error = HostNameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<HostName> for String {
    fn from(value: HostName) -> Self {
        value.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for HostName {
    type Err = HostNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["nas", "laptop-2", "db01", "a"] {
            assert!(HostName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_subject_breaking_names() {
        for bad in [
            "",
            "a.b",
            "a b",
            "A",
            "-x",
            "x*",
            "x>",
            "db_01",
            "7zip",
            "x-",
            &"a".repeat(64),
        ] {
            assert!(HostName::new(bad).is_err(), "{bad:?}");
        }
    }
}
