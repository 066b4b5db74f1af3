//! A small tmpfs mounted over a directory, to fill a repository's disk on
//! purpose. Unmounted on drop (also when a trial panics).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// A tmpfs of a fixed size mounted on a directory (needs root).
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
    mounted: bool,
}

/// Whether this process runs as root (mounting needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `dir` (created if missing; must be
    /// empty).
    pub fn mount(dir: &Path, mib: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(dir))
        .with_context(|| format!("cannot mount a {mib} MiB tmpfs on {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    /// Changes the size in place (`mount -o remount,size=…`): the files stay.
    pub fn resize(&self, mib: u64) -> Result<()> {
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={mib}m"))
            .arg(&self.dir))
        .with_context(|| format!("cannot resize the tmpfs on {}", self.dir.display()))
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts; a busy mount (a process still has files open) is detached
    /// lazily so it never outlives the trial in the mount table.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        if run(Command::new("umount").arg(&self.dir)).is_ok() {
            return Ok(());
        }
        run(Command::new("umount").arg("-l").arg(&self.dir))
            .with_context(|| format!("cannot unmount {}", self.dir.display()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("chaos: {e:#}");
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
