//! Test data on disk: writing files of known sizes and measuring trees
//! independently of the agent.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `len` bytes of a fixed pattern to `path`, creating parent directories.
pub fn write_file(path: &Path, len: usize) -> Result<()> {
    // Not all zeroes, so that a sparse-file or compression shortcut in the
    // engine cannot make sizes look right by accident.
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    write_bytes(path, &data)
}

/// Writes `data` to `path`, creating parent directories.
pub fn write_bytes(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

/// A file's text, or a note saying why there is none; for diagnostics only.
pub fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// What an estimate of a tree should report, counted by the test itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirStats {
    /// Regular files.
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symbolic links (not followed).
    pub symlinks: u64,
    /// Anything else.
    pub other: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
}

impl DirStats {
    /// Walks `path` without following symlinks.
    pub fn walk(path: &Path) -> Result<Self> {
        let mut stats = Self::default();
        stats.add(path)?;
        Ok(stats)
    }

    fn add(&mut self, path: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            self.dirs += 1;
            let entries =
                fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
            for entry in entries {
                self.add(&entry?.path())?;
            }
        } else if kind.is_file() {
            self.files += 1;
            self.bytes += meta.len();
        } else if kind.is_symlink() {
            self.symlinks += 1;
        } else {
            self.other += 1;
        }
        Ok(())
    }
}

/// Fills a fresh backup root with a few small files, so that every agent has
/// something to estimate.
pub(crate) fn seed_backup_root(root: &Path, host: &str) -> Result<()> {
    write_bytes(
        &root.join("README.txt"),
        format!("files of {host}\n").as_bytes(),
    )?;
    write_bytes(&root.join("docs/notes.txt"), b"nothing to see here\n")?;
    write_file(&root.join("docs/archive/data.bin"), 4096)
}
