//! `flotilla completions SHELL` and `flotilla man`: generated from the same
//! clap definitions that parse the command line, so they cannot drift.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;
use crate::error::CliError;

/// The completion script for `shell`.
pub(super) fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "flotilla", &mut out);
    out
}

/// The man page of `flotilla` (roff), listing every subcommand.
pub(super) fn page() -> Result<Vec<u8>, CliError> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|source| CliError::Io {
            path: PathBuf::from("-"),
            source,
        })?;
    Ok(out)
}

/// Writes `flotilla.1` and one `flotilla-SUBCOMMAND.1` per subcommand into
/// `dir` (created if missing); returns the files written.
pub(super) fn pages_into(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Built first, so that subcommands carry their full names
    // (`flotilla-backup`) into their pages.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    let mut todo = vec![cmd];
    while let Some(cmd) = todo.pop() {
        todo.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = clap_mangen::Man::new(cmd);
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text).map_err(io(&path))?;
        std::fs::write(&path, text).map_err(io(&path))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// Writes generated text to stdout; a closed stdout (`| head`) is no error.
pub(super) fn print(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Io {
            path: PathBuf::from("-"),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_completion_offers_every_subcommand_and_global_flag() {
        let script = String::from_utf8(completions(Shell::Bash)).expect("UTF-8");
        assert!(script.contains("_flotilla()"), "not a bash completion");
        for word in [
            "backup",
            "restore",
            "snapshots",
            "completions",
            "man",
            "--utc",
            "--quiet",
            "--recursive",
        ] {
            assert!(script.contains(word), "no {word} in the bash completion");
        }
        for shell in [Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            assert!(!completions(shell).is_empty(), "{shell}");
        }
    }

    #[test]
    fn the_man_page_is_roff_and_names_the_subcommands() {
        let page = String::from_utf8(page().expect("render")).expect("UTF-8");
        assert!(page.starts_with(".ie"), "{}", &page[..40.min(page.len())]);
        assert!(page.contains(".TH flotilla 1"), "no title line");
        for sub in ["backup", "restore", "forget", "enroll"] {
            assert!(page.contains(sub), "no {sub} in the man page");
        }
    }

    #[test]
    fn man_dir_writes_one_page_per_subcommand() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = dir.path().join("man1");
        let written = pages_into(&out).expect("write pages");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        for want in ["flotilla.1", "flotilla-backup.1", "flotilla-config-check.1"] {
            assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
        }
        let backup = std::fs::read_to_string(out.join("flotilla-backup.1")).expect("read");
        assert!(
            backup.contains("\\-\\-wait"),
            "the backup page lacks --wait"
        );
    }
}
