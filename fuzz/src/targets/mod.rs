//! One function per fuzz target; `fuzz/fuzz_targets/<name>.rs` calls it.
//!
//! Bus input (NATS): `task_envelope`, `task_body`, `heartbeat`, `event`,
//! `fleet_status`, `repo_reply`. Peer input (QUIC frames): `frame_request`,
//! `frame_response`, `snapshot_record`. Sealed data a key holder opens:
//! `tree`, `sealed_blob` (and the meta half of `snapshot_record`). Files:
//! `bundle`, `keyfile`, `repo_files` (a repository directory through the agent's public
//! API), `pack_format` and `index_file` (the agent's parsers directly; need
//! the `agent-internals` feature and the facade in fuzz/agent-facade.patch).

mod bundle;
mod event;
mod fleet_status;
mod frames;
mod heartbeat;
#[cfg(feature = "agent-internals")]
mod index_file;
mod keyfile;
#[cfg(feature = "agent-internals")]
mod pack_format;
mod repo_files;
mod sealed;
mod snapshot_record;
mod task;

pub use bundle::bundle;
pub use event::event;
pub use fleet_status::fleet_status;
pub use frames::{frame_request, frame_response, repo_reply};
pub use heartbeat::heartbeat;
#[cfg(feature = "agent-internals")]
pub use index_file::index_file;
pub use keyfile::keyfile;
#[cfg(feature = "agent-internals")]
pub use pack_format::pack_format;
pub use repo_files::repo_files;
pub use sealed::{sealed_blob, tree};
pub use snapshot_record::snapshot_record;
pub use task::{task_body, task_envelope};
