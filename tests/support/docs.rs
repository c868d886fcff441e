//! The sections of `docs/` that tests write, and how each is kept true.
//!
//! A section sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`. Two kinds:
//! * **checked**: deterministic output of the code (command output, rendered RBAC, tables with no
//!   timing). The test that produces it compares it with the committed text and fails on a
//!   difference, in CI as anywhere: a doc cannot drift from the code.
//! * **measured**: figures of one run (timings, sizes). They vary run to run, so a run does not
//!   compare them; with `TQ_UPDATE_DOCS=1` the test writes them, stamped with the date and the
//!   commit of the run. `tests/docs.rs` checks every section is registered here and every
//!   measured one carries a stamp naming a commit of this history, with no uncommitted changes.
//!
//! `TQ_UPDATE_DOCS=1 make test` (or one test with it set) rewrites both kinds; commit the result.
//! This file is also compiled alone by `tests/docs.rs` (no stack needed), so it uses std only.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Checked,
    Measured,
}

/// Every generated section: (file, name, kind, the test that writes it).
pub const SECTIONS: &[(&str, &str, Kind, &str)] = &[
    ("docs/install.md", "lint", Kind::Checked, "tests/helm.rs"),
    ("docs/install.md", "rbac", Kind::Checked, "tests/helm.rs"),
    ("docs/install.md", "seed", Kind::Checked, "tests/helm.rs"),
    ("docs/demand.md", "depth", Kind::Checked, "tests/demand.rs"),
    ("docs/demand.md", "eta", Kind::Measured, "tests/demand.rs"),
    ("docs/demand.md", "shared-queue", Kind::Checked, "tests/demand.rs"),
    ("docs/reliability.md", "isolation", Kind::Measured, "tests/robust.rs"),
    ("docs/reliability.md", "hostile-inputs", Kind::Checked, "tests/hostile.rs"),
    ("docs/reliability.md", "faults", Kind::Measured, "tests/faults.rs"),
    ("docs/reliability.md", "election", Kind::Measured, "tests/election.rs"),
    ("docs/reliability.md", "node-faults", Kind::Measured, "tests/pods.rs"),
    ("docs/broker-reads.md", "big-messages", Kind::Measured, "tests/broker_bounds.rs"),
    ("docs/broker-reads.md", "hostile-replies", Kind::Checked, "tests/broker_bounds.rs"),
    ("docs/broker-reads.md", "operator-rss", Kind::Measured, "tests/broker_bounds.rs"),
];

/// The stamp's opening words: a measured section's first line is
/// `_Measured on 2026-12-07 at commit 0123456789ab by tests/x.rs._`
pub const STAMP: &str = "_Measured on ";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn updating() -> bool {
    std::env::var_os("TQ_UPDATE_DOCS").is_some_and(|v| !v.is_empty() && v != "0")
}

fn kind_of(file: &str, name: &str) -> (Kind, &'static str) {
    SECTIONS
        .iter()
        .find(|s| s.0 == file && s.1 == name)
        .map(|s| (s.2, s.3))
        .unwrap_or_else(|| panic!("{file} section {name} is not registered in tests/support/docs.rs SECTIONS"))
}

/// The text between the markers of section `name` in `doc`, and where it starts and ends.
pub fn section(doc: &str, name: &str) -> Option<(usize, usize)> {
    let (begin, end) = (format!("<!-- {name}:begin -->\n"), format!("<!-- {name}:end -->"));
    let a = doc.find(&begin)? + begin.len();
    let b = a + doc[a..].find(&end)?;
    Some((a, b))
}

/// Every `<!-- NAME:begin -->` marker in `doc`.
pub fn markers(doc: &str) -> Vec<String> {
    doc.lines().filter_map(|l| l.strip_prefix("<!-- ")?.strip_suffix(":begin -->")).map(str::to_string).collect()
}

fn read(file: &str) -> (PathBuf, String) {
    let path = repo().join(file);
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    (path, doc)
}

fn replace(path: &Path, doc: &str, name: &str, body: &str) {
    let (a, b) = section(doc, name).unwrap_or_else(|| panic!("no markers for {name} in {}", path.display()));
    std::fs::write(path, format!("{}{body}{}", &doc[..a], &doc[b..])).unwrap();
}

/// A checked section: the committed text must be `body`, compared through `same` (which drops
/// what this run cannot reproduce, e.g. an age, or a column needing a server not present here).
/// With `TQ_UPDATE_DOCS=1` it is written instead.
pub fn checked(file: &str, name: &str, body: &str, same: impl Fn(&str) -> String) {
    assert_eq!(kind_of(file, name).0, Kind::Checked, "{file} {name}");
    let (path, doc) = read(file);
    let (a, b) = section(&doc, name).unwrap_or_else(|| panic!("no markers for {name} in {file}"));
    if updating() {
        replace(&path, &doc, name, body);
        return;
    }
    let (committed, now) = (same(&doc[a..b]), same(body));
    if committed != now {
        panic!(
            "{file} section `{name}` is not what the code prints now; if the change is intended, \
             rerun this test with TQ_UPDATE_DOCS=1 and commit the doc.\n{}",
            diff(&committed, &now)
        );
    }
}

/// A measured section: printed always, written (with its stamp) only with `TQ_UPDATE_DOCS=1`.
pub fn measured(file: &str, name: &str, body: &str) {
    let (kind, test) = kind_of(file, name);
    assert_eq!(kind, Kind::Measured, "{file} {name}");
    println!("{file} `{name}`:\n{body}");
    if !updating() {
        println!("(not written to {file}: TQ_UPDATE_DOCS=1 writes it, with the commit and date)");
        return;
    }
    let (path, doc) = read(file);
    replace(&path, &doc, name, &format!("{}\n\n{body}", stamp(test)));
}

/// `_Measured on DATE at commit HASH by TEST._`, saying so when the tree (docs aside) differs
/// from that commit: `tests/docs.rs` refuses such a stamp.
fn stamp(test: &str) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"])
        .is_none_or(|s| !s.is_empty());
    let date = Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let changes = if dirty { " with uncommitted changes" } else { "" };
    format!("{STAMP}{date} at commit {commit}{changes} by {test}._")
}

/// The lines only in `old` (`-`) and only in `new` (`+`), in order: enough to see a drift.
pub fn diff(old: &str, new: &str) -> String {
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let gone = o.iter().filter(|l| !n.contains(l)).map(|l| format!("- {l}"));
    let came = n.iter().filter(|l| !o.contains(l)).map(|l| format!("+ {l}"));
    let lines: Vec<String> = gone.chain(came).collect();
    if lines.is_empty() {
        "(the same lines, in another order)".into()
    } else {
        lines.join("\n")
    }
}
