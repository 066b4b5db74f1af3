//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what a finished backup or restore freed (an agent
//! that had backed up 100,000 files sat at 115-150 MiB until restarted),
//! spread over the arenas of the threads that ran it. Trimming returns the
//! free pages of every arena; it costs a walk over the free lists, so it runs
//! after each task and on a slow timer (which also covers the storage side,
//! whose sessions are not tasks of its own), never per file.
//!
//! Arenas are capped at two ([`limit_arenas`]), which keeps what an idle
//! agent holds small. mimalloc was tried instead: it returns memory by itself, but held twice
//! glibc's peak during the same restores (300+ MiB on the storage agent).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often an agent gives freed memory back, whatever it is doing.
const TRIM_EVERY: Duration = Duration::from_secs(15);

/// glibc arenas an agent uses, at most. By default glibc gives each thread
/// that meets a locked arena a new one, up to 8 per core; each keeps its own
/// free memory, which an idle agent then holds (a storage agent sat at 50 MiB
/// after a backup, 20 MiB with two arenas). The agent's allocations are few
/// and large (chunks, blobs), so two arenas cost no measurable speed.
const ARENAS: i32 = 2;

/// Caps glibc's arenas at [`ARENAS`]. Call it first thing in `main`, before
/// any other thread starts.
#[allow(unsafe_code)]
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; it takes no
    // pointers, and M_ARENA_MAX may be set at any time (it takes effect for
    // threads that look for an arena afterwards).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the allocator's free pages to the system. It takes the
/// allocator's locks for a moment: call it from a blocking thread.
#[allow(unsafe_code)]
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and shrinks glibc's own free lists;
    // it is thread-safe, takes no pointers and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims on a blocking thread, without waiting for it.
pub(crate) fn trim_soon() {
    tokio::task::spawn_blocking(trim);
}

/// Trims every [`TRIM_EVERY`] until cancelled.
pub(crate) async fn trim_loop(cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A trim that could not run is retried at the next tick.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}
