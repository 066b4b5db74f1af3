//! `estimate`: how much would a backup of these paths read?

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flotilla_protocol::{limits, DirUsage, EstimateReport};

use super::{Cancel, Counters, Progress};

const ERROR_SAMPLES: usize = 10;

/// A directory being walked: its entries still to visit and its totals so far.
struct Frame {
    path: PathBuf,
    entries: fs::ReadDir,
    bytes: u64,
    files: u64,
}

/// Walks `paths` without following symlinks or crossing into other roots twice,
/// counting entries and bytes, and finds the largest directories.
///
/// Unreadable entries are counted and sampled, never fatal. Returns early, with
/// what it has, when `cancel` is set.
pub fn estimate(paths: &[PathBuf], progress: &mut dyn Progress, cancel: &Cancel) -> EstimateReport {
    let started = Instant::now();
    let mut report = EstimateReport {
        paths: paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        ..Default::default()
    };
    let mut counters = Counters::default();
    // Min-heap of the largest directories seen so far.
    let mut largest: BinaryHeap<Reverse<(u64, u64, PathBuf)>> = BinaryHeap::new();

    // Nested requests (`/srv` and `/srv/www`) would count twice: drop the inner ones.
    let mut roots: Vec<&PathBuf> = paths.iter().collect();
    roots.sort();
    roots.dedup_by(|b, a| b.starts_with(a.as_path()));

    for root in roots {
        if cancel.is_cancelled() {
            break;
        }
        walk_root(
            root,
            &mut report,
            &mut counters,
            &mut largest,
            progress,
            cancel,
        );
    }

    let mut dirs: Vec<DirUsage> = largest
        .into_iter()
        .map(|Reverse((bytes, files, path))| DirUsage {
            path: path.to_string_lossy().into_owned(),
            bytes,
            files,
        })
        .collect();
    dirs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path)));
    report.largest_dirs = dirs;
    report.duration_ms = started.elapsed().as_millis() as u64;
    report
}

fn walk_root(
    root: &Path,
    report: &mut EstimateReport,
    counters: &mut Counters,
    largest: &mut BinaryHeap<Reverse<(u64, u64, PathBuf)>>,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) {
    let error = |report: &mut EstimateReport, path: &Path, e: std::io::Error| {
        report.errors += 1;
        if report.error_samples.len() < ERROR_SAMPLES {
            report
                .error_samples
                .push(format!("{}: {e}", path.display()));
        }
    };
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) => return error(report, root, e),
    };
    if !meta.is_dir() {
        count_entry(&meta, report, counters);
        progress.update(counters, root);
        return;
    }
    report.dirs += 1;
    counters.dirs += 1;
    let mut stack = match fs::read_dir(root) {
        Ok(entries) => vec![Frame {
            path: root.to_path_buf(),
            entries,
            bytes: 0,
            files: 0,
        }],
        Err(e) => return error(report, root, e),
    };
    while let Some(top) = stack.last_mut() {
        if cancel.is_cancelled() {
            return;
        }
        match top.entries.next() {
            Some(Ok(entry)) => {
                let path = entry.path();
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) => {
                        error(report, &path, e);
                        continue;
                    }
                };
                if meta.is_dir() {
                    report.dirs += 1;
                    counters.dirs += 1;
                    progress.update(counters, &path);
                    match fs::read_dir(&path) {
                        Ok(entries) => stack.push(Frame {
                            path,
                            entries,
                            bytes: 0,
                            files: 0,
                        }),
                        Err(e) => error(report, &path, e),
                    }
                } else {
                    let size = count_entry(&meta, report, counters);
                    top.bytes += size;
                    top.files += u64::from(meta.is_file());
                    progress.update(counters, &path);
                }
            }
            Some(Err(e)) => {
                let path = top.path.clone();
                error(report, &path, e);
                // A failing directory stream does not recover; stop reading it.
                finish_frame(&mut stack, largest);
            }
            None => finish_frame(&mut stack, largest),
        }
    }
}

/// Pops the top directory, records its size and adds it to its parent's.
fn finish_frame(stack: &mut Vec<Frame>, largest: &mut BinaryHeap<Reverse<(u64, u64, PathBuf)>>) {
    let Some(done) = stack.pop() else { return };
    if let Some(parent) = stack.last_mut() {
        parent.bytes += done.bytes;
        parent.files += done.files;
    }
    largest.push(Reverse((done.bytes, done.files, done.path)));
    if largest.len() > limits::ESTIMATE_TOP_DIRS {
        largest.pop();
    }
}

fn count_entry(meta: &fs::Metadata, report: &mut EstimateReport, counters: &mut Counters) -> u64 {
    let ft = meta.file_type();
    if ft.is_file() {
        report.files += 1;
        report.bytes += meta.len();
        counters.files += 1;
        counters.bytes += meta.len();
        meta.len()
    } else {
        if ft.is_symlink() {
            report.symlinks += 1;
        } else {
            report.other += 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NoProgress;

    #[test]
    fn counts_files_dirs_bytes_and_ranks_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::create_dir_all(root.join("c")).expect("mkdir");
        fs::write(root.join("a/one"), vec![0; 100]).expect("write");
        fs::write(root.join("a/b/two"), vec![0; 1000]).expect("write");
        fs::write(root.join("c/three"), vec![0; 10]).expect("write");
        std::os::unix::fs::symlink("/nonexistent", root.join("c/link")).expect("symlink");

        let report = estimate(
            &[root.to_path_buf(), root.join("a")],
            &mut NoProgress,
            &Cancel::default(),
        );
        assert_eq!(
            (report.files, report.dirs, report.symlinks, report.bytes),
            (3, 4, 1, 1110)
        );
        assert_eq!(report.largest_dirs[0].path, root.to_string_lossy());
        assert_eq!(report.largest_dirs[0].bytes, 1110);
        assert_eq!(report.largest_dirs[1].bytes, 1100);
        assert_eq!(report.largest_dirs[1].files, 2);
    }
}
