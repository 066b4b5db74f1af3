//! Data-plane test data: reproducible pseudo-random bytes, and comparing a
//! restored tree with the one it came from, independently of the agent.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// At most this many differences are listed by [`tree_differences`].
const MAX_DIFFERENCES: usize = 40;
/// Buffer size for generating and comparing file contents.
const BUF: usize = 1 << 20;

/// xorshift64*: fast and reproducible. Different seeds give unrelated,
/// incompressible streams, so neither compression nor deduplication can make
/// two of them look alike.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let bytes = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&bytes[..n]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    XorShift::new(seed).fill(&mut data);
    data
}

/// Writes `len` pseudo-random bytes from `seed` to `path` (creating parent
/// directories), a megabyte at a time: the same seed and length always give
/// the same file.
pub fn write_random(path: &Path, seed: u64, len: u64) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; BUF];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(BUF as u64)).unwrap_or(BUF);
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Where `original` (an absolute path that was backed up) lands when a
/// snapshot is restored into `target`: `target` + the absolute path.
pub fn restored_path(target: &Path, original: &Path) -> PathBuf {
    target.join(original.strip_prefix("/").unwrap_or(original))
}

/// Bytes actually allocated on disk for `path` (`st_blocks` × 512).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(meta.blocks() * 512)
}

/// The largest regular file under `dir` (recursively) whose name ends with
/// `.ext`, with its size.
pub fn largest_file(dir: &Path, ext: &str) -> Result<Option<(PathBuf, u64)>> {
    let mut best: Option<(PathBuf, u64)> = None;
    let mut stack = vec![dir.to_path_buf()];
    let suffix = format!(".{ext}");
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            let path = entry.path();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && path.to_string_lossy().ends_with(&suffix)
                && best.as_ref().is_none_or(|(_, size)| meta.len() > *size)
            {
                best = Some((path, meta.len()));
            }
        }
    }
    Ok(best)
}

/// Every `*.pack` file under `dir` (none if it does not exist).
pub fn pack_files(dir: &Path) -> Result<std::collections::BTreeSet<PathBuf>> {
    let mut found = std::collections::BTreeSet::new();
    if !dir.exists() {
        return Ok(found);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "pack") {
                found.insert(path);
            }
        }
    }
    Ok(found)
}

/// One blob entry of a pack file (docs/repository.md, "Pack file").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// 0 data, 1 tree.
    pub kind: u8,
    /// Where the sealed bytes start.
    pub offset: u64,
    /// How many sealed bytes there are.
    pub length: u64,
}

/// The blob entries of a pack, read from its bytes the way the format
/// defines them (header, entries, trailer), so a test can aim at a data blob
/// instead of guessing an offset.
pub fn pack_entries(path: &Path) -> Result<Vec<PackEntry>> {
    const HEADER: usize = 10;
    const ENTRY_HEADER: usize = 4 + 1 + 32 + 4 + 32;
    const TRAILER: usize = 44;
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < HEADER + TRAILER || &bytes[..8] != b"FLOTPACK" {
        bail!("{} is not a pack file", path.display());
    }
    let end = bytes.len() - TRAILER;
    let mut at = HEADER;
    let mut entries = Vec::new();
    while at < end {
        if at + ENTRY_HEADER > end || &bytes[at..at + 4] != b"BLOB" {
            bail!("{}: no blob entry at byte {at}", path.display());
        }
        let kind = bytes[at + 4];
        let len_at = at + 4 + 1 + 32;
        let length = u32::from_be_bytes(bytes[len_at..len_at + 4].try_into()?) as usize;
        let offset = at + ENTRY_HEADER;
        if offset + length > end {
            bail!(
                "{}: blob at byte {at} runs past the trailer",
                path.display()
            );
        }
        entries.push(PackEntry {
            kind,
            offset: offset as u64,
            length: length as u64,
        });
        at = offset + length;
    }
    Ok(entries)
}

/// Inverts every bit of the byte at `offset` of `path`, in place.
pub fn flip_byte(path: &Path, offset: u64) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)
        .with_context(|| format!("cannot read byte {offset} of {}", path.display()))?;
    byte[0] = !byte[0];
    file.write_all_at(&byte, offset)
        .with_context(|| format!("cannot write byte {offset} of {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}

/// Whether two files hold the same bytes (compared a megabyte at a time, so
/// a 1 GiB sparse file costs no memory).
pub fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; BUF], vec![0u8; BUF]);
    loop {
        let na =
            read_full(&mut fa, &mut ba).with_context(|| format!("cannot read {}", a.display()))?;
        let nb =
            read_full(&mut fb, &mut bb).with_context(|| format!("cannot read {}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What [`tree_differences`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Paths, kinds, symlink targets and file contents.
    Contents,
    /// Also permission bits (not of symlinks) and mtimes in whole seconds.
    Everything,
}

/// One entry of a walked tree.
#[derive(Debug)]
struct Entry {
    kind: &'static str,
    mode: u32,
    mtime: i64,
    size: u64,
    target: Option<PathBuf>,
}

/// Every entry below `root` (not `root` itself), by path relative to it.
fn walk(root: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for item in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let item = item?;
            let rel = rel.join(item.file_name());
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push(rel.clone());
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "other"
            };
            let target = if ft.is_symlink() {
                Some(
                    fs::read_link(&path)
                        .with_context(|| format!("cannot read link {}", path.display()))?,
                )
            } else {
                None
            };
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: meta.mode() & 0o7777,
                    mtime: meta.mtime(),
                    size: if ft.is_file() { meta.len() } else { 0 },
                    target,
                },
            );
        }
    }
    Ok(out)
}

/// How `restored` differs from `original`, one line per difference (the
/// first few dozen); empty when they are the same as far as `what` goes.
pub fn tree_differences(original: &Path, restored: &Path, what: Compare) -> Result<Vec<String>> {
    if !restored.is_dir() {
        bail!(
            "{} is not a directory (nothing restored there?)",
            restored.display()
        );
    }
    let (a, b) = (walk(original)?, walk(restored)?);
    let mut diffs = Vec::new();
    for (rel, ea) in &a {
        let shown = rel.display();
        let Some(eb) = b.get(rel) else {
            diffs.push(format!("{shown}: missing from the restore"));
            continue;
        };
        if ea.kind != eb.kind {
            diffs.push(format!("{shown}: {} restored as {}", ea.kind, eb.kind));
            continue;
        }
        if ea.target != eb.target {
            diffs.push(format!(
                "{shown}: link target {:?} restored as {:?}",
                ea.target, eb.target
            ));
        }
        if ea.kind == "file" {
            if ea.size != eb.size {
                diffs.push(format!("{shown}: size {} restored as {}", ea.size, eb.size));
            } else if !same_contents(&original.join(rel), &restored.join(rel))? {
                diffs.push(format!("{shown}: contents differ"));
            }
        }
        if what == Compare::Everything {
            if ea.kind != "symlink" && ea.mode != eb.mode {
                diffs.push(format!(
                    "{shown}: mode {:04o} restored as {:04o}",
                    ea.mode, eb.mode
                ));
            }
            if ea.mtime != eb.mtime {
                diffs.push(format!(
                    "{shown}: mtime {} restored as {}",
                    ea.mtime, eb.mtime
                ));
            }
        }
    }
    for rel in b.keys().filter(|rel| !a.contains_key(*rel)) {
        diffs.push(format!(
            "{}: restored, but not in the original",
            rel.display()
        ));
    }
    if diffs.len() > MAX_DIFFERENCES {
        let more = diffs.len() - MAX_DIFFERENCES;
        diffs.truncate(MAX_DIFFERENCES);
        diffs.push(format!("… and {more} more"));
    }
    Ok(diffs)
}
