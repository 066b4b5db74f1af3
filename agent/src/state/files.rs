//! The file cache: what the last committed backup into a repository saw of
//! every file (size, times, inode, chunks), so unchanged files are not read.
//!
//! It lives in one file per repository, `files/<hash of repo id>.cache` under
//! the state directory, read whole into a hash map when a backup starts and
//! written whole (temporary file, fsync, rename) after a commit. A backup
//! touches every entry anyway; one sequential read and one sequential write
//! cost far less time and memory than 100,000 lookups and a 100,000-entry
//! replacement in sled (measured: 10 s and 1.4 GiB peak for that, see
//! docs/benchmarks.md).
//!
//! A missing, unreadable or newer-format cache is an empty one: every file is
//! simply read again.
//!
//! Beside the files, it keeps what that backup saw of each of its paths (files
//! beneath, mount point or not), so the next backup can tell a path whose
//! disk is not mounted from one that is really empty ([`crate::engine::check_roots`]).
//! Caches written before that have no such record; they decode with none,
//! and files counted under a path stand in for it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::engine::{CachedFile, FileCache, RootBefore, RootRecord};

/// Version of the cache file's contents.
pub const CACHE_VERSION: u16 = 2;

/// The file as stored: version first, then every entry.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    v: u16,
    entries: Vec<(serde_bytes::ByteBuf, CachedFile)>,
    /// The backup's paths; absent from caches written before it was kept
    /// (a field added with a default, so the version stays).
    #[serde(default)]
    roots: Vec<(serde_bytes::ByteBuf, RootRecord)>,
}

/// Only the version, read before the entries.
#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

/// The file cache of one repository, in memory.
#[derive(Debug, Default)]
pub struct MapFileCache {
    entries: HashMap<Vec<u8>, CachedFile>,
    roots: HashMap<Vec<u8>, RootRecord>,
}

impl MapFileCache {
    /// What the backup that wrote this cache saw of `path`: its own record
    /// when `path` was one of its paths, else the files it kept beneath
    /// `path` (mount point unknown); `None` when it knew nothing there.
    pub fn root_before(&self, path: &Path) -> Option<RootBefore> {
        let key = path.as_os_str().as_bytes();
        if let Some(r) = self.roots.get(key) {
            return Some(RootBefore {
                files: r.files,
                mount_point: Some(r.mount_point),
            });
        }
        let files = self.entries.keys().filter(|p| is_beneath(p, key)).count() as u64;
        (files > 0).then_some(RootBefore {
            files,
            mount_point: None,
        })
    }
}

/// Whether the file at `file` is `dir` or lies beneath it (path bytes).
fn is_beneath(file: &[u8], dir: &[u8]) -> bool {
    match file.strip_prefix(dir) {
        Some(rest) => rest.is_empty() || rest.starts_with(b"/") || dir.ends_with(b"/"),
        None => false,
    }
}

// Only tests ask how big a cache is; the agent just loads and replaces it.
#[cfg(test)]
impl MapFileCache {
    /// Number of files it knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it knows no file.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FileCache for MapFileCache {
    fn get(&self, path: &[u8]) -> Option<CachedFile> {
        self.entries.get(path).cloned()
    }
}

/// Where the cache of `repo_id` lives under `dir`. The id comes from the
/// storage host, so it is hashed rather than trusted as a file name.
pub fn cache_path(dir: &Path, repo_id: &str) -> PathBuf {
    let name = blake3::hash(repo_id.as_bytes()).to_hex();
    dir.join(format!("{}.cache", &name[..32]))
}

/// Reads the cache at `path`; anything unreadable is an empty cache.
pub fn load(path: &Path) -> MapFileCache {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return MapFileCache::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the file cache; reading every file");
            return MapFileCache::default();
        }
    };
    match rmp_serde::from_slice::<VersionOnly>(&bytes) {
        Ok(VersionOnly { v: CACHE_VERSION }) => {}
        Ok(VersionOnly { v }) => {
            warn!(path = %path.display(), v, "file cache of another format; reading every file");
            return MapFileCache::default();
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable file cache; reading every file");
            return MapFileCache::default();
        }
    }
    match rmp_serde::from_slice::<CacheFile>(&bytes) {
        Ok(file) => MapFileCache {
            entries: file
                .entries
                .into_iter()
                .map(|(path, entry)| (path.into_vec(), entry))
                .collect(),
            roots: file
                .roots
                .into_iter()
                .map(|(path, root)| (path.into_vec(), root))
                .collect(),
        },
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable file cache; reading every file");
            MapFileCache::default()
        }
    }
}

/// Writes `entries` and `roots` as the cache at `path`, atomically: a crash
/// leaves the old cache or the new one, never a torn file.
pub fn store(
    path: &Path,
    entries: Vec<(Vec<u8>, CachedFile)>,
    roots: Vec<(Vec<u8>, RootRecord)>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("cache.tmp");
    let file = CacheFile {
        v: CACHE_VERSION,
        entries: entries
            .into_iter()
            .map(|(p, e)| (serde_bytes::ByteBuf::from(p), e))
            .collect(),
        roots: roots
            .into_iter()
            .map(|(p, r)| (serde_bytes::ByteBuf::from(p), r))
            .collect(),
    };
    {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        rmp_serde::encode::write_named(&mut out, &file).map_err(std::io::Error::other)?;
        out.flush()?;
        out.get_ref().sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Removes the cache at `path` (the repository lost blobs it points at).
pub fn remove(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::repo::{BlobId, ChunkRef};

    fn entry(size: u64) -> CachedFile {
        CachedFile {
            size,
            mtime_ns: 1,
            ctime_ns: 2,
            inode: 3,
            dev: 4,
            chunks: vec![ChunkRef {
                id: BlobId([7; 32]),
                len: size as u32,
            }],
        }
    }

    #[test]
    fn round_trips_and_replaces_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), "repo-1");
        assert!(load(&path).is_empty(), "missing file is an empty cache");
        store(
            &path,
            vec![(b"/a".to_vec(), entry(1)), (b"/b".to_vec(), entry(2))],
            Vec::new(),
        )
        .expect("store");
        let cache = load(&path);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(b"/b"), Some(entry(2)));
        store(&path, vec![(b"/c".to_vec(), entry(3))], Vec::new()).expect("store");
        let cache = load(&path);
        assert_eq!((cache.len(), cache.get(b"/a")), (1, None));
        remove(&path).expect("remove");
        assert!(load(&path).is_empty());
    }

    #[test]
    fn damaged_or_newer_cache_reads_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), "repo-1");
        fs::write(&path, b"\x92\xcdgarbage").expect("write");
        assert!(load(&path).is_empty());
        // A real entry: the same file under this version loads it, so only
        // the version check can make the newer one read as empty.
        let encoded = |v| {
            rmp_serde::to_vec_named(&CacheFile {
                v,
                entries: vec![(serde_bytes::ByteBuf::from(b"/a".to_vec()), entry(1))],
                roots: Vec::new(),
            })
            .expect("encode")
        };
        fs::write(&path, encoded(CACHE_VERSION)).expect("write");
        assert_eq!(load(&path).get(b"/a"), Some(entry(1)));
        fs::write(&path, encoded(CACHE_VERSION + 1)).expect("write");
        assert!(load(&path).is_empty());
    }

    #[test]
    fn the_paths_of_the_last_backup_are_kept_and_counted_without_a_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), "repo-1");
        let record = RootRecord {
            files: 7,
            mount_point: true,
        };
        store(
            &path,
            vec![
                (b"/srv/data/a".to_vec(), entry(1)),
                (b"/srv/data/sub/b".to_vec(), entry(2)),
                (b"/srv/database".to_vec(), entry(3)),
            ],
            vec![(b"/srv/data".to_vec(), record)],
        )
        .expect("store");
        let cache = load(&path);
        // A path of that backup: its record, which counted every file.
        assert_eq!(
            cache.root_before(Path::new("/srv/data")),
            Some(RootBefore {
                files: 7,
                mount_point: Some(true)
            })
        );
        // Any other: the files kept beneath it, mount point unknown
        // (`/srv/database` is not beneath `/srv/data`).
        assert_eq!(
            cache.root_before(Path::new("/srv/data/sub")),
            Some(RootBefore {
                files: 1,
                mount_point: None
            })
        );
        assert_eq!(
            cache.root_before(Path::new("/srv")).map(|r| r.files),
            Some(3)
        );
        assert_eq!(cache.root_before(Path::new("/home")), None);
    }

    #[test]
    fn a_cache_written_before_roots_were_kept_loads_with_its_files() {
        #[derive(Serialize)]
        struct OldCacheFile {
            v: u16,
            entries: Vec<(serde_bytes::ByteBuf, CachedFile)>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), "repo-1");
        let old = OldCacheFile {
            v: CACHE_VERSION,
            entries: vec![(serde_bytes::ByteBuf::from(b"/srv/a".to_vec()), entry(1))],
        };
        fs::write(&path, rmp_serde::to_vec_named(&old).expect("encode")).expect("write");
        let cache = load(&path);
        assert_eq!(cache.get(b"/srv/a"), Some(entry(1)));
        assert_eq!(
            cache.root_before(Path::new("/srv")),
            Some(RootBefore {
                files: 1,
                mount_point: None
            })
        );
    }

    #[test]
    fn repository_ids_never_become_paths() {
        let p = cache_path(Path::new("/s/files"), "../../etc/passwd");
        assert_eq!(p.parent(), Some(Path::new("/s/files")));
    }
}
