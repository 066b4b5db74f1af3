//! Open enums: a fixed set of snake_case words on the wire, typed in code,
//! that still decode a word a newer peer added (into `Other`).
//!
//! serde's `#[serde(other)]` would keep the set open but lose the word; an
//! `Other(String)` keeps it, so it is shown and passed on as it came. The
//! wire form is exactly the string (`from`/`into` `String`), as the `String`
//! fields these enums replaced carried it.

/// Defines `$name` with unit variants spelled `$word` on the wire and an
/// `Other(String)` fallback, plus `as_str`, `Display` and the conversions
/// from and to `String`.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A word this build does not know (a newer peer's), kept as it came.
            Other(String),
        }

        impl $name {
            /// Every known variant, in declaration order.
            pub const KNOWN: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The word on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $word, )+
                    $name::Other(word) => word,
                }
            }
        }

        impl From<&str> for $name {
            fn from(word: &str) -> Self {
                match word {
                    $( $word => $name::$variant, )+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl From<String> for $name {
            fn from(word: String) -> Self {
                match $name::from(word.as_str()) {
                    $name::Other(_) => $name::Other(word),
                    known => known,
                }
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                match value {
                    $name::Other(word) => word,
                    known => known.as_str().to_owned(),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use open_enum;
