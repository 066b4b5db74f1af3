//! Fuzz targets for every decoder of bus, peer and disk input.
//!
//! Each target is a plain function `fn(&[u8])` in [`targets`]; the files in
//! `fuzz/fuzz_targets/` only hand libFuzzer's input to it. Keeping the logic
//! here lets an ordinary `cargo test --lib` (stable, no libFuzzer) replay the
//! committed seeds and every input in `fuzz/regressions/<target>/`.
//!
//! A target must never panic on any input. Where a decode succeeds, it
//! re-encodes the value and decodes it again, and checks that nothing changed
//! (the round trip a property test would check), plus whatever the decoded
//! value promises (a version in range, a verified task that matches its
//! checks, a scanned pack that the index validator accepts, ...).

pub mod common;
pub mod packfmt;
pub mod targets;

/// Every target this build has, by name (the `[[bin]]` names in Cargo.toml).
pub fn all() -> Vec<(&'static str, fn(&[u8]))> {
    #[allow(unused_mut)]
    let mut all: Vec<(&'static str, fn(&[u8]))> = vec![
        ("task_envelope", targets::task_envelope as fn(&[u8])),
        ("task_body", targets::task_body as fn(&[u8])),
        ("heartbeat", targets::heartbeat as fn(&[u8])),
        ("event", targets::event as fn(&[u8])),
        ("fleet_status", targets::fleet_status as fn(&[u8])),
        ("frame_request", targets::frame_request as fn(&[u8])),
        ("frame_response", targets::frame_response as fn(&[u8])),
        ("repo_reply", targets::repo_reply as fn(&[u8])),
        ("snapshot_record", targets::snapshot_record as fn(&[u8])),
        ("tree", targets::tree as fn(&[u8])),
        ("sealed_blob", targets::sealed_blob as fn(&[u8])),
        ("bundle", targets::bundle as fn(&[u8])),
        ("keyfile", targets::keyfile as fn(&[u8])),
        ("repo_files", targets::repo_files as fn(&[u8])),
    ];
    #[cfg(feature = "agent-internals")]
    all.extend([
        ("pack_format", targets::pack_format as fn(&[u8])),
        ("index_file", targets::index_file as fn(&[u8])),
    ]);
    all
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::{Path, PathBuf};

    fn fuzz_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn inputs(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Every committed seed and every regression input runs through its
    /// target without a panic. A crash libFuzzer found becomes a test by
    /// copying it into `fuzz/regressions/<target>/` (see fuzz/README.md).
    #[test]
    fn seeds_and_regressions_pass() {
        let mut failed = Vec::new();
        let mut ran = 0;
        for (name, target) in super::all() {
            for sub in ["seeds", "regressions"] {
                for path in inputs(&fuzz_dir().join(sub).join(name)) {
                    let data = fs::read(&path).expect("read input");
                    ran += 1;
                    if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                        failed.push(format!("{name}: {}", path.display()));
                    }
                }
            }
        }
        super::common::remove_scratch();
        assert!(ran > 0, "no seeds found under {}", fuzz_dir().display());
        assert!(
            failed.is_empty(),
            "inputs that panic:\n{}",
            failed.join("\n")
        );
    }

    /// Each target has its `fuzz_targets/<name>.rs`, a `[[bin]]` and seeds.
    #[test]
    fn every_target_is_wired_and_seeded() {
        let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("Cargo.toml");
        for (name, _) in super::all() {
            assert!(
                fuzz_dir()
                    .join("fuzz_targets")
                    .join(format!("{name}.rs"))
                    .is_file(),
                "fuzz_targets/{name}.rs is missing"
            );
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "Cargo.toml has no [[bin]] {name}"
            );
            assert!(
                !inputs(&fuzz_dir().join("seeds").join(name)).is_empty(),
                "seeds/{name}/ is empty (run fuzz/seeds.py)"
            );
        }
    }

    /// The harness's copies of the task signing context and of the seal
    /// format still match the protocol crate.
    #[test]
    fn harness_copies_match_the_protocol() {
        super::common::self_check();
    }
}
