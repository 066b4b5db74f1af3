//! The `restore` task on a destination host.

use std::path::{Component, Path, PathBuf};

use flotilla_protocol::{RejectReason, TaskBody, TaskKind, TaskOutcome, TaskResult};
use tokio::runtime::Handle;

use super::backup::{failed, session_err};
use super::Agent;
use super::JobError;
use crate::engine::{self, Cancel, PathRefused, RestoreOptions};
use crate::transfer::client::{BlockingFetch, Session};

impl Agent {
    pub(super) async fn restore(
        &self,
        body: &TaskBody,
        envelope: &[u8],
        cancel: &Cancel,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let TaskKind::Restore {
            snapshot,
            storage,
            storage_addr,
            target,
            includes,
            preserve_special,
        } = &body.kind
        else {
            return Err(failed("not a restore task"));
        };
        let (key, endpoint) = self.data_plane()?;
        let target = match allowed_target(Path::new(target), &self.settings.restore_roots) {
            Ok(t) => t,
            Err(refused) => {
                self.reject(
                    Some(body.id.clone()),
                    RejectReason::NotAllowed,
                    refused.to_string(),
                    &flotilla_protocol::subject::task(&self.settings.host),
                )
                .await;
                return Err(JobError::Refused(refused));
            }
        };
        let mut session = Session::open(&endpoint, *storage_addr, storage, envelope)
            .await
            .map_err(session_err)?;
        let record = session
            .snapshot(snapshot.as_str())
            .await
            .map_err(session_err)?;
        if !record.id.starts_with(snapshot.as_str()) {
            return Err(failed(format!(
                "storage {storage} answered snapshot {} for {snapshot}",
                record.id
            )));
        }
        record.verify(&key).map_err(|e| failed(e.to_string()))?;
        let mut fetch = BlockingFetch::new(Handle::current(), session.fetcher());
        // Another host's snapshot may carry what would raise privileges
        // here (a compromised host can put anything in its backups).
        let strip_special = !preserve_special && record.host != self.settings.host;
        let opts = RestoreOptions {
            target,
            includes: includes.clone(),
            restore_owner: true,
            strip_special,
        };
        let cancel = cancel.clone();
        let tree = record.tree;
        let summary = self
            .with_progress(body, None, move |progress| {
                engine::restore(&tree, &key, &mut fetch, &opts, progress, &cancel)
            })
            .await?;
        session.close();
        let summary = summary.map_err(|e| JobError::Failed {
            retryable: e.is_retryable(),
            message: e.to_string(),
        })?;
        let outcome = if summary.errors > 0 {
            TaskOutcome::Partial
        } else {
            TaskOutcome::Succeeded
        };
        Ok((outcome, TaskResult::Restore(summary)))
    }
}

/// Checks that `target` lies inside a restore root and creates it.
///
/// The target need not exist: its deepest existing ancestor is resolved
/// (symlinks included) and the rest must be plain names, so `..` and symlinks
/// cannot lead outside the roots. The created directory is checked again.
fn allowed_target(target: &Path, roots: &[PathBuf]) -> Result<PathBuf, PathRefused> {
    let shown = target.display().to_string();
    if !target.is_absolute() {
        return Err(PathRefused::NotAbsolute(shown));
    }
    let mut existing = target.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    while std::fs::symlink_metadata(&existing).is_err() {
        let Some(name) = existing.file_name() else {
            break;
        };
        rest.push(name.to_owned());
        if !existing.pop() {
            break;
        }
    }
    let base = std::fs::canonicalize(&existing).map_err(|e| PathRefused::Unreadable {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let mut full = base;
    for name in rest.iter().rev() {
        let comp = Path::new(name);
        if !matches!(comp.components().next(), Some(Component::Normal(_))) {
            return Err(PathRefused::OutsideRoots(shown));
        }
        full.push(name);
    }
    if !target
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        || !roots.iter().any(|r| full.starts_with(r))
    {
        return Err(PathRefused::OutsideRoots(shown));
    }
    std::fs::create_dir_all(&full).map_err(|e| PathRefused::Unreadable {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let canonical = std::fs::canonicalize(&full).map_err(|e| PathRefused::Unreadable {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    if !roots.iter().any(|r| canonical.starts_with(r)) {
        return Err(PathRefused::OutsideRoots(shown));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_stay_inside_restore_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path())
            .expect("canonical")
            .join("restore");
        std::fs::create_dir_all(&root).expect("mkdir");
        let roots = vec![root.clone()];
        assert_eq!(
            allowed_target(&root.join("a/b"), &roots).expect("ok"),
            root.join("a/b")
        );
        assert!(allowed_target(&root.join("../escape"), &roots).is_err());
        assert!(allowed_target(Path::new("/etc"), &roots).is_err());
        std::os::unix::fs::symlink("/tmp", root.join("link")).expect("symlink");
        assert!(allowed_target(&root.join("link/x"), &roots).is_err());
        assert!(allowed_target(Path::new("relative"), &roots).is_err());
    }
}
