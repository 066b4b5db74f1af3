//! Size limits every decoder checks before it looks at a byte.
//!
//! Limits are generous for honest peers and small enough that a hostile one cannot
//! make a decoder allocate much. NATS itself caps a message at its `max_payload`
//! (1 MiB by default); these are tighter, per message type.

/// A signed task envelope (body, signature and framing).
pub const TASK_BYTES: usize = 64 * 1024;
/// A health heartbeat.
pub const HEARTBEAT_BYTES: usize = 64 * 1024;
/// An event on the event stream.
pub const EVENT_BYTES: usize = 256 * 1024;
/// Paths one estimate task may name.
pub const TASK_PATHS: usize = 256;
/// Largest directories an estimate reports.
pub const ESTIMATE_TOP_DIRS: usize = 10;
