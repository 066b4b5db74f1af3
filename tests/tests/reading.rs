//! What a person reads (issue 9, item 8), tried as a new user would: one
//! plain line per error, `ls` showing a directory's contents, local or UTC
//! times without milliseconds and RFC 3339 in every JSON, a hint after a task
//! is sent, the config file found by `FLOTILLA_CONFIG` or in `/etc/flotilla`,
//! restic's `--keep-within`, `enroll --help` matching the validation,
//! completions, man pages, `-q`/`-v`, and progress lines that fit 80 columns.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use flotilla_tests::{
    binaries, flotilla_cli, free_port, json_values, write_file, write_random, CliOutput, Fleet,
    NatsServer, DATA_TIMEOUT, STARTUP_TIMEOUT,
};
use serde_json::Value;

use super::dataplane::{assert_exit, backup_ok, snapshot_of, start_world};
use super::path_str;

// ---- helpers ---------------------------------------------------------------

/// `2026-03-01T15:00:00.250Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Whether `s` holds an RFC 3339 time anywhere.
fn has_rfc3339(s: &str) -> bool {
    s.as_bytes()
        .windows(24)
        .any(|w| std::str::from_utf8(w).is_ok_and(|w| is_rfc3339(&Value::from(w))))
}

/// Whether `s` holds `YYYY-MM-DD HH:MM:SS` (a human time to the second).
fn has_human_time(s: &str) -> bool {
    s.as_bytes().windows(19).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
    })
}

/// The lines of stderr that `main` wrote as the command's error.
fn error_lines(out: &CliOutput) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("flotilla:"))
        .collect()
}

/// `flotilla ARGS…` with `FLOTILLA_CONFIG` set and nothing else from the
/// fleet, run in `cwd`.
fn cli_with_config(config: &Path, cwd: &Path, args: &[&str]) -> CliOutput {
    let bin = &binaries().flotilla;
    let out = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env_remove("FLOTILLA_FLEET")
        .env_remove("FLOTILLA_NATS_URL")
        .env("FLOTILLA_CONFIG", config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run flotilla");
    CliOutput {
        command: format!(
            "FLOTILLA_CONFIG={} flotilla {}",
            config.display(),
            args.join(" ")
        ),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out: false,
    }
}

/// Waits until `host` has `n` snapshots; returns them, oldest first.
fn wait_snapshots(fleet: &Fleet, host: &str, n: usize) -> Vec<Value> {
    fleet.wait_for(&format!("{n} snapshot(s) of {host}"), DATA_TIMEOUT, || {
        let list = fleet.snapshots(&["--host", host])?;
        Ok((list.len() >= n).then_some(list))
    })
}

/// `ls ARGS… --json`: the listed paths, in order.
fn ls_paths(fleet: &Fleet, args: &[&str]) -> Vec<String> {
    let mut all = vec!["ls"];
    all.extend_from_slice(args);
    all.push("--json");
    let listing = fleet.cli_json(all).expect("ls --json");
    listing
        .as_array()
        .expect("ls --json prints an array")
        .iter()
        .map(|e| {
            e["path"]
                .as_str()
                .expect("each entry has a path")
                .to_owned()
        })
        .collect()
}

// ---- tests -----------------------------------------------------------------

/// Errors are one `flotilla: …` line with no "(retryable)"; with `--json`
/// they are one JSON object that carries `retryable` and `exit_code`.
#[test]
fn an_error_is_one_plain_line_and_retryability_is_json_only() {
    let port = free_port().expect("a free port");
    let url = format!("nats://127.0.0.1:{port}");

    let out = flotilla_cli(["--nats", url.as_str(), "hosts"]).expect("run flotilla hosts");
    assert_eq!(out.code, Some(5), "{out}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {out}");
    assert!(
        lines[0].starts_with("flotilla: cannot reach NATS at "),
        "{out}"
    );
    assert_eq!(lines[0].matches(url.as_str()).count(), 1, "{out}");
    assert!(!out.stderr.contains("retryable"), "{out}");

    let out = flotilla_cli(["--nats", url.as_str(), "hosts", "--json"]).expect("run hosts --json");
    assert_eq!(out.code, Some(5), "{out}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let error: Value = serde_json::from_str(lines[0]).expect("the error is JSON");
    assert_eq!(error["type"], "error", "{out}");
    assert_eq!(error["retryable"], true, "{out}");
    assert_eq!(error["exit_code"], 5, "{out}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot reach NATS")),
        "{out}"
    );
}

/// `enroll --help` states the rule `HostName` enforces; a name with `_` is
/// refused with the same rule.
#[test]
fn enroll_help_matches_the_host_name_validation() {
    let out = flotilla_cli(["enroll", "--help"]).expect("run enroll --help");
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("1-63 characters of a-z, 0-9 and '-', starting with a letter"),
        "{out}"
    );
    assert!(out.stdout.contains("no '_'"), "{out}");
    assert!(
        !out.stdout.contains("'-', '_'"),
        "the old help is back: {out}"
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let bundle = dir.path().join("b.toml");
    let out = flotilla_cli([
        OsStr::new("enroll"),
        OsStr::new("web_1"),
        OsStr::new("--out"),
        bundle.as_os_str(),
    ])
    .expect("run enroll web_1");
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("a-z, 0-9 and '-'"), "{out}");
    assert!(!bundle.exists(), "a bundle was written for a refused name");
}

/// `--plan` and `config check` read `FLOTILLA_CONFIG`; with neither it nor
/// `./flotilla.toml`, they read `/etc/flotilla/flotilla.toml`.
#[test]
fn the_config_comes_from_flotilla_config_or_etc() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("plans.toml");
    std::fs::write(
        &config,
        "[serve]\ntick = \"1s\"\n[[plan]]\nschedule = \"0 3 * * *\"\nname = \"home\"\n\
         hosts = [\"alpha\"]\nto = \"nas\"\n",
    )
    .expect("write the config");
    let elsewhere = tempfile::tempdir().expect("an empty working directory");

    let out = cli_with_config(&config, elsewhere.path(), &["config", "check"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("plans.toml: ok"), "{out}");

    // The plan is looked up in FLOTILLA_CONFIG's file: the error names it.
    let out = cli_with_config(&config, elsewhere.path(), &["backup", "--plan", "nope"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert_eq!(error_lines(&out).len(), 1, "{out}");
    assert!(out.stderr.contains("no plan \"nope\" in "), "{out}");
    assert!(out.stderr.contains("plans.toml"), "{out}");

    // Without FLOTILLA_CONFIG and without ./flotilla.toml: /etc/flotilla.
    if !Path::new("/etc/flotilla/flotilla.toml").exists() {
        let bin = &binaries().flotilla;
        let out = Command::new(bin)
            .args(["backup", "--plan", "home"])
            .current_dir(elsewhere.path())
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("run flotilla");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("/etc/flotilla/flotilla.toml"), "{stderr}");
    }
}

#[test]
fn completions_and_man_pages_are_generated() {
    let out = flotilla_cli(["completions", "bash"]).expect("run completions bash");
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("_flotilla()"), "{out}");
    assert!(out.stdout.contains("snapshots"), "{out}");

    let out = flotilla_cli(["man"]).expect("run man");
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains(".TH flotilla 1"), "{out}");

    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = flotilla_cli([
        OsStr::new("man"),
        OsStr::new("--dir"),
        dir.path().as_os_str(),
    ])
    .expect("run man --dir");
    assert_eq!(out.code, Some(0), "{out}");
    for page in ["flotilla.1", "flotilla-backup.1", "flotilla-ls.1"] {
        assert!(dir.path().join(page).is_file(), "no {page}: {out}");
    }
}

/// `-q` and `-v` set the log level of both programs, over `RUST_LOG`.
#[test]
fn quiet_and_verbose_set_the_log_level() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _loud = fleet
        .agent("loud")
        .arg("-vv")
        .start()
        .expect("start a -vv agent");
    let _quiet = fleet
        .agent("hush")
        .arg("-q")
        .start()
        .expect("start a -q agent");
    fleet.wait_online(&["loud", "hush"], STARTUP_TIMEOUT);
    let log = |host: &str| std::fs::read_to_string(fleet.agent_log(host)).expect("agent log");
    // The harness runs agents with RUST_LOG=info; the flags win.
    assert!(log("loud").contains("DEBUG"), "{}", log("loud"));
    let hush = log("hush");
    assert!(
        !hush.contains(" INFO "),
        "a -q agent logged at info:\n{hush}"
    );

    let out = fleet.cli(["-vv", "hosts"]).expect("run flotilla -vv hosts");
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("DEBUG"), "-vv logs debug lines: {out}");
    let out = fleet.cli(["hosts"]).expect("run flotilla hosts");
    assert!(!out.stderr.contains("DEBUG"), "{out}");
}

/// A backup sent without `--wait`, and what a person then reads about it:
/// the hint, `ls` of the snapshot, times in tables and JSON, restic's
/// `--keep-within`, and a refused task's one error line.
#[test]
fn what_a_person_reads_about_a_backup() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let root = agents[1].backup_root().to_path_buf();
    let root_s = path_str(&root);
    write_file(&root.join("reading/a.txt"), 100).expect("write a.txt");
    write_file(&root.join("reading/sub/b.txt"), 200).expect("write b.txt");

    // Sent without --wait: a hint names the commands that follow it.
    let out = fleet
        .cli(["backup", "alpha", "--to", "nas"])
        .expect("run flotilla backup");
    assert_exit(&fleet, &out, 0, "backup without --wait");
    assert!(out.stderr.contains("sent backup task "), "{out}");
    assert!(
        out.stderr.contains("`flotilla watch`") && out.stderr.contains("`flotilla jobs`"),
        "no hint after the task was sent: {out}"
    );
    let first = wait_snapshots(&fleet, "alpha", 1);
    let first_id = first[0]["id"].as_str().expect("an id").to_owned();

    // JSON: RFC 3339 everywhere.
    assert!(is_rfc3339(&first[0]["time"]), "{:#}", first[0]);
    let alpha = fleet.host("alpha").expect("hosts").expect("alpha listed");
    assert!(is_rfc3339(&alpha["last_seen"]), "{alpha:#}");
    let jobs = fleet.cli_json(["jobs", "--json"]).expect("jobs --json");
    let job = jobs
        .as_array()
        .and_then(|j| {
            j.iter()
                .find(|j| j["host"] == "alpha" && j["kind"] == "backup")
        })
        .unwrap_or_else(|| fleet.fail(format!("no backup job of alpha: {jobs:#}")));
    assert!(is_rfc3339(&job["started"]), "{job:#}");
    let status = fleet.cli_json(["status", "--json"]).expect("status --json");
    assert!(
        status["hosts"]
            .as_array()
            .is_some_and(|h| h.iter().all(|h| is_rfc3339(&h["last_seen"]))),
        "{status:#}"
    );

    // Tables: local time by default, UTC with --utc, never milliseconds.
    let local = fleet.cli(["snapshots"]).expect("snapshots");
    assert_exit(&fleet, &local, 0, "snapshots");
    assert!(has_human_time(&local.stdout), "{local}");
    assert!(!local.stdout.contains(" UTC"), "{local}");
    assert!(
        !has_rfc3339(&local.stdout),
        "milliseconds in a table: {local}"
    );
    let utc = fleet.cli(["snapshots", "--utc"]).expect("snapshots --utc");
    assert!(
        has_human_time(&utc.stdout) && utc.stdout.contains(" UTC"),
        "{utc}"
    );
    assert!(!has_rfc3339(&utc.stdout), "milliseconds in a table: {utc}");

    // ls: the contents of the backed-up path, of a directory, recursively.
    let top = ls_paths(&fleet, &[&first_id]);
    assert!(!top.contains(&root_s), "ls lists the root itself: {top:?}");
    assert!(top.contains(&format!("{root_s}/reading")), "{top:?}");
    assert!(
        top.iter().all(|p| p.starts_with(&format!("{root_s}/"))),
        "{top:?}"
    );
    let docs = format!("{root_s}/reading");
    assert_eq!(
        ls_paths(&fleet, &[&first_id, &docs]),
        [format!("{docs}/a.txt"), format!("{docs}/sub")]
    );
    assert_eq!(
        ls_paths(&fleet, &[&first_id, &docs, "--recursive"]),
        [
            format!("{docs}/a.txt"),
            format!("{docs}/sub"),
            format!("{docs}/sub/b.txt")
        ]
    );
    let text = fleet
        .cli(["ls", first_id.as_str(), docs.as_str(), "-r"])
        .expect("ls -r as text");
    assert_exit(&fleet, &text, 0, "ls -r");
    assert!(text.stdout.contains(&format!("{docs}/sub/b.txt")), "{text}");
    assert!(has_human_time(&text.stdout), "{text}");

    // --keep-within counts back from the newest snapshot, not from now: with
    // both snapshots older than the window, the newest is still kept.
    sleep(Duration::from_secs(3));
    let second = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    sleep(Duration::from_secs(3));
    let out = fleet
        .cli([
            "forget",
            "--host",
            "alpha",
            "--keep-within",
            "2s",
            "--dry-run",
            "--json",
        ])
        .expect("run forget --keep-within");
    assert_exit(&fleet, &out, 0, "forget --keep-within --dry-run");
    let verdicts: Vec<Value> = json_values(&out)
        .expect("JSON lines")
        .into_iter()
        .filter(|v| v["type"] == "verdict")
        .collect();
    let verdict = |id: &str| {
        verdicts
            .iter()
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| fleet.fail(format!("no verdict on {id}:\n{out}")))
            .clone()
    };
    assert_eq!(verdict(&second)["keep"], true, "{out}");
    assert_eq!(
        verdict(&second)["reasons"],
        serde_json::json!(["within"]),
        "{out}"
    );
    assert_eq!(verdict(&first_id)["keep"], false, "{out}");
    assert!(verdicts.iter().all(|v| is_rfc3339(&v["time"])), "{out}");

    // A refused task: its reason once, in one `flotilla:` line.
    let outside = fleet.dir().join("outside-the-roots");
    std::fs::create_dir_all(&outside).expect("create a directory outside the roots");
    let outside_s = path_str(&outside);
    let out = fleet
        .cli_with_timeout(
            [
                "backup",
                "alpha",
                "--to",
                "nas",
                "--path",
                outside_s.as_str(),
                "--wait",
            ],
            DATA_TIMEOUT,
        )
        .expect("run a refused backup");
    assert_exit(&fleet, &out, 4, "a backup outside the roots is refused");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].contains("alpha"), "{out}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(all.matches(outside_s.as_str()).count(), 1, "{out}");
    assert!(!all.contains("retryable"), "{out}");
}

/// `backup --wait` on a pipe prints progress lines of at most 80 columns,
/// even for a 16-character host name and hundreds of megabytes.
#[test]
fn progress_lines_fit_80_columns() {
    const HOST: &str = "workstation-0001";
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &[HOST]);
    // Big enough to take longer than the agent's one-second progress tick.
    write_random(&agents[1].backup_root().join("big.bin"), 7, 320 << 20).expect("write test data");

    let out = fleet
        .cli_with_timeout(["backup", HOST, "--to", "nas", "--wait"], DATA_TIMEOUT)
        .expect("run flotilla backup --wait");
    assert_exit(&fleet, &out, 0, "backup --wait");
    let progress: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with(HOST) && l.contains("/s"))
        .collect();
    if progress.is_empty() {
        fleet.fail(format!("no progress line was printed:\n{out}"));
    }
    for line in &progress {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}",
            line.chars().count()
        );
        assert!(!line.contains('\x1b'), "escape codes on a pipe: {line:?}");
    }
    assert!(progress.iter().any(|l| l.contains('%')), "{out}");
}
