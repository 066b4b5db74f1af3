//! `EIO` on the repository's writes and fsyncs, switched on and off from
//! outside the storage agent: an `LD_PRELOAD` library (`chaos/shim/eio.c`,
//! built here with the system C compiler on first use) that fails the calls
//! on files below one directory while a flag file exists.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The shim's source, built once per run.
const SOURCE: &str = include_str!("../shim/eio.c");

/// The built library, or why it could not be built.
static SHIM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The shim library, built on first use into the temporary directory.
pub fn shim() -> Result<PathBuf> {
    SHIM.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<PathBuf> {
    // A fresh directory only this user can write (0700, random name): the
    // library is loaded into a root process, so nobody else may plant or
    // swap it. Kept for the run (the agents load it at every start).
    let dir = tempfile::Builder::new()
        .prefix("flotilla-chaos-eio-")
        .tempdir()
        .context("cannot create a directory for the EIO shim")?
        .keep();
    let src = dir.join("eio.c");
    let lib = dir.join("libchaos_eio.so");
    fs::write(&src, SOURCE)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .with_context(|| format!("cannot run the C compiler `{cc}` (set CC)"))?;
    if !out.status.success() {
        bail!(
            "`{cc}` could not build the EIO shim: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(lib)
}

/// Which calls fail while the switch is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Writes and fsyncs.
    All,
    /// Only fsync and fdatasync (the data reached the page cache, the disk
    /// refused to keep it).
    Sync,
}

/// The switch of one agent's shim: a flag file, and the count of calls it
/// failed.
#[derive(Debug)]
pub struct EioSwitch {
    flag: PathBuf,
}

impl EioSwitch {
    /// A switch whose flag file is `flag` (absent: off).
    pub fn new(flag: &Path) -> Self {
        let _ = fs::remove_file(flag);
        let _ = fs::remove_file(hits_path(flag));
        Self {
            flag: flag.to_path_buf(),
        }
    }

    /// The environment an agent needs to obey this switch for `dir`.
    pub fn env(&self, dir: &Path) -> Result<Vec<(String, String)>> {
        Ok(vec![
            ("LD_PRELOAD".to_owned(), shim()?.display().to_string()),
            ("CHAOS_EIO_DIR".to_owned(), dir.display().to_string()),
            ("CHAOS_EIO_FLAG".to_owned(), self.flag.display().to_string()),
        ])
    }

    /// From now on, `calls` on files below the directory fail with EIO.
    pub fn on(&self, calls: Calls) -> Result<()> {
        let mode = match calls {
            Calls::All => "all",
            Calls::Sync => "sync",
        };
        fs::write(&self.flag, mode).with_context(|| format!("cannot write {}", self.flag.display()))
    }

    /// From now on, every call goes through.
    pub fn off(&self) -> Result<()> {
        match fs::remove_file(&self.flag) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.flag.display())),
        }
    }

    /// Calls failed so far.
    pub fn hits(&self) -> u64 {
        fs::metadata(hits_path(&self.flag)).map_or(0, |m| m.len())
    }
}

fn hits_path(flag: &Path) -> PathBuf {
    let mut name = flag.as_os_str().to_owned();
    name.push(".hits");
    PathBuf::from(name)
}
