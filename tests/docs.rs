//! The generated sections of `docs/` are all known, and each measured one says when and on which
//! commit it was measured (tests/support/docs.rs explains the two kinds). Checked sections are
//! compared with the code's output by the tests that produce them; this file needs no stack.

#[allow(dead_code)] // the writers are for the tests that produce the sections
#[path = "support/docs.rs"]
mod docs;

use docs::{Kind, SECTIONS, STAMP};
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(file: &str) -> String {
    std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_generated_section_is_registered_and_every_registered_one_exists() {
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let file = format!("docs/{}", entry.unwrap().file_name().to_string_lossy());
        if !file.ends_with(".md") {
            continue;
        }
        for name in docs::markers(&read(&file)) {
            if !SECTIONS.iter().any(|s| s.0 == file && s.1 == name) {
                problems.push(format!("{file}: section {name} is written by no registered test"));
            }
        }
    }
    for (file, name, _, test) in SECTIONS {
        if docs::section(&read(file), name).is_none() {
            problems.push(format!("{file}: no markers for {name} (written by {test})"));
        }
        let source = read(test);
        if !source.contains(&format!("\"{file}\"")) || !source.contains(&format!("\"{name}\"")) {
            problems.push(format!("{test} does not write {file} {name}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The commit a measured section names must be in this history, and the run must have been on
/// that commit as it is (no uncommitted changes): otherwise nobody can tell what code it measured.
#[test]
fn every_measured_section_names_the_date_and_a_commit_of_this_history() {
    let history = Command::new("git").arg("-C").arg(repo()).args(["rev-parse", "--git-dir"]).output();
    let has_history = history.is_ok_and(|o| o.status.success());
    let mut problems = Vec::new();
    for (file, name, kind, test) in SECTIONS {
        let doc = read(file);
        let Some((a, b)) = docs::section(&doc, name) else { continue };
        let first = doc[a..b].lines().next().unwrap_or_default();
        let stamped = first.starts_with(STAMP);
        match kind {
            Kind::Checked if stamped => problems.push(format!("{file} {name}: checked, but stamped as measured")),
            Kind::Checked => {}
            Kind::Measured => match parse(first) {
                None => problems.push(format!(
                    "{file} {name}: no stamp `{STAMP}YYYY-MM-DD at commit HASH by {test}._` on its first line; \
                     rerun {test} with TQ_UPDATE_DOCS=1 on a committed tree"
                )),
                Some((_, _, true)) => problems.push(format!(
                    "{file} {name}: measured with uncommitted changes; rerun {test} with TQ_UPDATE_DOCS=1 after committing"
                )),
                Some((_, commit, false)) if has_history && !is_ancestor(&commit) => {
                    problems.push(format!("{file} {name}: commit {commit} is not in this branch's history"))
                }
                Some(_) => {}
            },
        }
    }
    if !has_history {
        println!("no git history here: the stamps' commits were not looked up");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `_Measured on DATE at commit HASH[ with uncommitted changes] by TEST._` → (date, hash, dirty).
fn parse(line: &str) -> Option<(String, String, bool)> {
    let rest = line.strip_prefix(STAMP)?;
    let (date, rest) = rest.split_once(" at commit ")?;
    let (commit, _) = rest.split_once(' ')?;
    let date_ok = date.len() == 10 && date.chars().enumerate().all(|(i, c)| (i == 4 || i == 7) == (c == '-'));
    let hash_ok = commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit());
    (date_ok && hash_ok && line.ends_with("._"))
        .then(|| (date.to_string(), commit.to_string(), rest.contains(" with uncommitted changes ")))
}

fn is_ancestor(commit: &str) -> bool {
    Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["merge-base", "--is-ancestor", commit, "HEAD"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_stamp_is_read_back_and_a_bad_one_is_refused() {
    let good = "_Measured on 2026-12-07 at commit 0123456789ab by tests/robust.rs._";
    assert_eq!(parse(good), Some(("2026-12-07".into(), "0123456789ab".into(), false)));
    let dirty = "_Measured on 2026-12-07 at commit 0123456789ab with uncommitted changes by tests/robust.rs._";
    assert_eq!(parse(dirty).map(|p| p.2), Some(true));
    for bad in [
        "_Measured on 7 Dec at commit 0123456789ab by tests/robust.rs._",
        "_Measured on 2026-12-07 at commit unknown by tests/robust.rs._",
        "_Measured on 2026-12-07 at commit 0123456789ab by tests/robust.rs._ and more",
        "Measured on 2026-12-07 at commit 0123456789ab by tests/robust.rs.",
    ] {
        assert_eq!(parse(bad), None, "{bad}");
    }
    assert_eq!(docs::diff("a\nb\n", "a\nc\n"), "- b\n+ c");
}

/// Every test the docs cite (`tests/F.rs::NAME`, `module::tests::NAME`; a name ending in `…` is
/// a prefix) exists: a doc must not vouch for a check that is gone.
#[test]
fn every_test_the_docs_cite_exists() {
    let mut problems = Vec::new();
    let mut cited = 0;
    let mut files = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    for file in files {
        let text = read(&file);
        for (at, _) in text.match_indices("::") {
            let word = |s: &str, rev: bool| -> String {
                let ok = |c: &char| c.is_ascii_alphanumeric() || *c == '_' || *c == '/' || *c == '.' || *c == '…';
                if rev {
                    s.chars().rev().take_while(ok).collect::<Vec<_>>().into_iter().rev().collect()
                } else {
                    s.chars().take_while(ok).collect()
                }
            };
            let (path, name) = (word(&text[..at], true), word(&text[at + 2..], false));
            let source = if path.starts_with("tests/") && path.ends_with(".rs") {
                path.clone()
            } else if path == "tests" {
                // `module::tests::NAME`: the module is the word before.
                let module = word(text[..at - "tests".len()].strip_suffix("::").unwrap_or_default(), true);
                let file = format!("src/{}.rs", module.replace("::", "/"));
                let dir = format!("src/{module}/mod.rs");
                if repo().join(&file).exists() {
                    file
                } else {
                    dir
                }
            } else {
                continue;
            };
            cited += 1;
            let body = std::fs::read_to_string(repo().join(&source)).unwrap_or_default();
            let found = match name.strip_suffix('…') {
                Some(prefix) => body.contains(&format!("fn {prefix}")),
                None => body.contains(&format!("fn {name}(")),
            };
            if !found {
                problems.push(format!("{file} cites {source}::{name}, which does not exist"));
            }
        }
    }
    assert!(cited >= 5, "the citations were not found ({cited}): the parser is broken");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
