//! What the agent knows about its host: load, memory, disk space of its roots.
//!
//! Read from `/proc` and `statvfs`; every reading that fails is reported as
//! zero (or as the root's `error`), never as a failure of the heartbeat.

use std::path::Path;

use flotilla_protocol::{RootKind, RootUsage};

/// Load averages from `/proc/loadavg`.
pub fn load_average() -> [f32; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    out
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    pages * page_size
}

/// Total and available memory of the host, in bytes, from `/proc/meminfo`.
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Free and total bytes of the filesystem holding `path`.
pub fn root_usage(kind: RootKind, path: &Path) -> RootUsage {
    let mut usage = RootUsage {
        kind,
        path: path.to_string_lossy().into_owned(),
        free_bytes: 0,
        total_bytes: 0,
        error: None,
    };
    match nix::sys::statvfs::statvfs(path) {
        Ok(st) => {
            let frag = st.fragment_size();
            usage.free_bytes = st.blocks_available().saturating_mul(frag);
            usage.total_bytes = st.blocks().saturating_mul(frag);
        }
        Err(e) => usage.error = Some(format!("cannot measure: {e}")),
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        assert!(rss_bytes() > 0);
        let (total, avail) = memory();
        assert!(total >= avail && total > 0);
        let u = root_usage(RootKind::Backup, Path::new("/"));
        assert!(u.total_bytes > 0 && u.error.is_none());
        let missing = root_usage(RootKind::Backup, Path::new("/does/not/exist"));
        assert!(missing.error.is_some());
    }
}
