//! Celery-identical task routing (pure): the matcher of `celery/app/routes.py` and the routing
//! table built from TaskQueue routes.
//!
//! Celery's `MapRoute` looks a task name up among the exact keys first, then tries the glob keys
//! in order (first match wins). A key is a glob only if it contains `*`; a glob is compiled with
//! Python's `fnmatch.translate` and matched against the whole name, case-sensitively. This module
//! ports `fnmatch.translate` (CPython 3.11) token by token, including its quirks: `[` without a
//! closing `]` is literal, `[!...]` negates, ranges that run backwards are dropped, and a
//! backslash is an ordinary character. Python's output uses atomic groups that the `regex` crate
//! rejects, so matching is a small hand-written glob matcher instead; every segment between stars
//! has a fixed length, so leftmost matching with star backtracking gives the same answers.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use kube::ResourceExt;

use crate::crd::TaskQueue;

/// Celery's `task_default_queue`.
pub const DEFAULT_QUEUE: &str = "celery";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Star,
    Char(CharSet),
}

/// What one non-star position of a glob accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CharSet {
    Any,
    Never,
    Literal(char),
    Class { negated: bool, ranges: Vec<(char, char)> },
}

impl CharSet {
    fn matches(&self, c: char) -> bool {
        match self {
            CharSet::Any => true,
            CharSet::Never => false,
            CharSet::Literal(l) => *l == c,
            CharSet::Class { negated, ranges } => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
        }
    }
}

/// A compiled glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    /// Compile like `re.compile(fnmatch.translate(pattern))`; the error is what makes Python raise.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let pat: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < pat.len() {
            let c = pat[i];
            i += 1;
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::Char(CharSet::Any)),
                '[' => {
                    let mut j = i;
                    if j < pat.len() && pat[j] == '!' {
                        j += 1;
                    }
                    if j < pat.len() && pat[j] == ']' {
                        j += 1;
                    }
                    while j < pat.len() && pat[j] != ']' {
                        j += 1;
                    }
                    if j >= pat.len() {
                        tokens.push(Token::Char(CharSet::Literal('[')));
                    } else {
                        tokens.push(Token::Char(class(&pat, i, j)?));
                        i = j + 1;
                    }
                }
                other => tokens.push(Token::Char(CharSet::Literal(other))),
            }
        }
        Ok(Glob { tokens })
    }

    /// Whole-name match (Python's `regex.match` on a pattern ending in `\Z`).
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let (mut t, mut n) = (0, 0);
        // Where to resume after the last star: (token after it, name position it absorbed up to).
        let mut resume: Option<(usize, usize)> = None;
        loop {
            match self.tokens.get(t) {
                Some(Token::Star) => {
                    t += 1;
                    resume = Some((t, n));
                    continue;
                }
                Some(Token::Char(set)) if n < name.len() && set.matches(name[n]) => {
                    t += 1;
                    n += 1;
                    continue;
                }
                None if n == name.len() => return true,
                _ => {}
            }
            match resume {
                Some((rt, rn)) if rn < name.len() => {
                    resume = Some((rt, rn + 1));
                    t = rt;
                    n = rn + 1;
                }
                _ => return false,
            }
        }
    }

    /// Characters that must match exactly (the sort key "specificity" of the routing table).
    pub fn literal_len(&self) -> usize {
        self.tokens.iter().filter(|t| matches!(t, Token::Char(CharSet::Literal(_)))).count()
    }
}

/// `[...]` between `pat[i]` and the closing `pat[j]`, as `fnmatch.translate` builds the regex
/// class and `re` then reads it.
fn class(pat: &[char], i: usize, j: usize) -> Result<CharSet, String> {
    let stuff: Vec<char> = pat[i..j].to_vec();
    // Each element: (char, escaped). Escaped characters are always literal in the class; an
    // unescaped '-' joins two chunks into a range.
    let mut body: Vec<(char, bool)> = Vec::new();
    if !stuff.contains(&'-') {
        body.extend(stuff.iter().map(|&c| (c, false)));
    } else {
        let mut chunks: Vec<Vec<char>> = Vec::new();
        let mut start = i;
        let mut k = if pat[i] == '!' { i + 2 } else { i + 1 };
        while let Some(found) = (k..j).find(|&x| pat[x] == '-') {
            chunks.push(pat[start..found].to_vec());
            start = found + 1;
            k = found + 3;
        }
        let last = pat[start..j].to_vec();
        if last.is_empty() {
            chunks.last_mut().ok_or("empty class")?.push('-');
        } else {
            chunks.push(last);
        }
        // Remove empty ranges (Python: invalid in RE).
        for k in (1..chunks.len()).rev() {
            let prev_last = *chunks[k - 1].last().ok_or("IndexError in fnmatch.translate")?;
            let next_first = *chunks[k].first().ok_or("IndexError in fnmatch.translate")?;
            if prev_last > next_first {
                let tail = chunks.remove(k);
                let prev = &mut chunks[k - 1];
                prev.pop();
                prev.extend_from_slice(&tail[1..]);
            }
        }
        for (n, chunk) in chunks.iter().enumerate() {
            if n > 0 {
                body.push(('-', false));
            }
            // Backslashes and hyphens inside a chunk are escaped: literal.
            body.extend(chunk.iter().map(|&c| (c, c == '\\' || c == '-')));
        }
    }
    if body.is_empty() {
        return Ok(CharSet::Never);
    }
    if body == [('!', false)] {
        return Ok(CharSet::Any);
    }
    let negated = body[0] == ('!', false);
    if negated {
        body.remove(0);
    }
    let mut ranges = Vec::new();
    let mut p = 0;
    while p < body.len() {
        let (lo, _) = body[p];
        let is_range = body.get(p + 1) == Some(&('-', false)) && p + 2 < body.len();
        if is_range {
            let (hi, _) = body[p + 2];
            if lo > hi {
                return Err(format!("bad character range {lo}-{hi}"));
            }
            ranges.push((lo, hi));
            p += 3;
        } else {
            ranges.push((lo, lo));
            p += 1;
        }
    }
    Ok(CharSet::Class { negated, ranges })
}

/// One compiled `task_routes` mapping, as Celery's `MapRoute`.
#[derive(Clone, Debug)]
pub struct Router {
    exact: HashMap<String, (String, String)>,
    globs: Vec<(Glob, String, String)>,
    default_queue: String,
}

/// Where a task goes and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub queue: String,
    /// The table key that matched; None when the default queue was used.
    pub pattern: Option<String>,
}

impl Router {
    /// From `(pattern, queue)` pairs in table order.
    pub fn new(table: &[(String, String)], default_queue: &str) -> Result<Self, String> {
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (pattern, queue) in table {
            if pattern.contains('*') {
                let glob = Glob::new(pattern).map_err(|e| format!("pattern {pattern:?}: {e}"))?;
                globs.push((glob, pattern.clone(), queue.clone()));
            } else {
                exact.insert(pattern.clone(), (pattern.clone(), queue.clone()));
            }
        }
        Ok(Router { exact, globs, default_queue: default_queue.to_string() })
    }

    pub fn route(&self, task: &str) -> Decision {
        if let Some((p, q)) = self.exact.get(task) {
            return Decision { queue: q.clone(), pattern: Some(p.clone()) };
        }
        for (glob, p, q) in &self.globs {
            if glob.matches(task) {
                return Decision { queue: q.clone(), pattern: Some(p.clone()) };
            }
        }
        Decision { queue: self.default_queue.clone(), pattern: None }
    }
}

/// A route left out of the table, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `namespace/name` of the TaskQueue that declared it.
    pub object: String,
    pub pattern: String,
    pub reason: String,
}

/// The merged routing table of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// `(pattern, queue)` in table order.
    pub entries: Vec<(String, String)>,
    pub rejected: Vec<Rejected>,
}

impl Table {
    /// `[[pattern, {"queue": q}], ...]`: the value of `task_routes.json`, loaded by Celery with
    /// `app.conf.task_routes = (json.load(open(path)),)`.
    pub fn to_json(&self) -> String {
        render(&self.entries.iter().map(entry_json).collect::<Vec<_>>())
    }

    /// [`Table::to_json`] cut into lists of at most `budget` bytes each (whole entries, at
    /// least one per part), in order: the table is their concatenation. For a table too big
    /// for one ConfigMap (1 MiB).
    pub fn to_json_parts(&self, budget: usize) -> Vec<String> {
        let mut parts = Vec::new();
        let mut part: Vec<String> = Vec::new();
        // Rendered size: "[\n  " + lines joined by ",\n  " + "\n]" = 2 + Σ(line + 4).
        let mut size = 2;
        for line in self.entries.iter().map(entry_json) {
            let cost = line.len() + 4;
            if !part.is_empty() && size + cost > budget {
                parts.push(render(&std::mem::take(&mut part)));
                size = 2;
            }
            size += cost;
            part.push(line);
        }
        if !part.is_empty() || parts.is_empty() {
            parts.push(render(&part));
        }
        parts
    }
}

fn entry_json((pattern, queue): &(String, String)) -> String {
    serde_json::json!([pattern, {"queue": queue}]).to_string()
}

/// One entry per line, so `kubectl get configmap -o yaml` and diffs stay readable.
fn render(lines: &[String]) -> String {
    if lines.is_empty() {
        return "[]".into();
    }
    format!("[\n  {}\n]", lines.join(",\n  "))
}

/// The TaskQueues oldest first (creation time, then name): who wins a pattern claimed twice,
/// and who owns the routing table.
pub fn oldest_first<T: Borrow<TaskQueue>>(taskqueues: &[T]) -> Vec<&TaskQueue> {
    let mut oldest: Vec<&TaskQueue> = taskqueues.iter().map(Borrow::borrow).collect();
    oldest.sort_by_key(|t| (t.metadata.creation_timestamp.as_ref().map(|c| c.0), t.name_any()));
    oldest
}

/// Merge the routes of `taskqueues` into one table.
///
/// Order: exact task names first (alphabetical; Celery looks them up before any glob anyway),
/// then globs by specificity: more literal characters first, so `app.tasks.video.*` is tried
/// before `app.tasks.*`; ties keep the declaring TaskQueue's name order, then its list order.
/// A pattern claimed by two TaskQueues goes to the older one (creation time, then name); the
/// newer one's route is rejected. So is a route whose queue its TaskQueue does not consume, and
/// a glob Celery itself could not compile.
pub fn build_table<T: Borrow<TaskQueue>>(taskqueues: &[T]) -> Table {
    let owners = oldest_first(taskqueues);
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut exact = Vec::new();
    let mut globs = Vec::new();
    let mut rejected = Vec::new();
    for tq in owners {
        let object = match tq.namespace() {
            Some(ns) => format!("{ns}/{}", tq.name_any()),
            None => tq.name_any(),
        };
        let queues: Vec<&String> = std::iter::once(&tq.spec.queue).chain(tq.spec.extra_queues.iter()).collect();
        for (index, route) in tq.spec.routes.iter().enumerate() {
            let queue = route.queue.clone().unwrap_or_else(|| tq.spec.queue.clone());
            let reject = |reason: String| Rejected { object: object.clone(), pattern: route.pattern.clone(), reason };
            if !queues.contains(&&queue) {
                rejected.push(reject(format!("queue {queue:?} is not consumed by this TaskQueue")));
                continue;
            }
            if let Some(owner) = claimed.get(&route.pattern) {
                rejected.push(reject(format!("pattern already claimed by TaskQueue {owner}")));
                continue;
            }
            if route.pattern.contains('*') {
                match Glob::new(&route.pattern) {
                    Ok(g) => globs.push((Reverse(g.literal_len()), tq.name_any(), index, route.pattern.clone(), queue)),
                    Err(e) => {
                        rejected.push(reject(format!("Celery cannot compile this glob: {e}")));
                        continue;
                    }
                }
            } else {
                exact.push((route.pattern.clone(), queue));
            }
            claimed.insert(route.pattern.clone(), object.clone());
        }
    }
    exact.sort();
    globs.sort();
    let entries = exact.into_iter().chain(globs.into_iter().map(|(_, _, _, p, q)| (p, q))).collect();
    Table { entries, rejected }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Glob::new(pattern).unwrap().matches(name)
    }

    #[test]
    fn fnmatch_semantics() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool)] = &[
            ("app.worker.tasks.ai_tasks.*", "app.worker.tasks.ai_tasks.run", true),
            ("app.worker.tasks.ai_tasks.*", "app.worker.tasks.ai_tasks.", true),   // * matches empty
            ("app.worker.tasks.ai_tasks.*", "app.worker.tasks.ai_tasks.a.b", true), // and dots
            ("app.worker.tasks.ai_tasks.*", "xapp.worker.tasks.ai_tasks.run", false), // anchored
            ("app.*", "App.x", false),                                              // case-sensitive
            ("*.import", "data.import", true),
            ("*.import", "data.importer", false),
            ("a?c*", "abc", true),
            ("a?c*", "ac", false),
            ("*[ab]x", "zzbx", true),
            ("*[!ab]x", "zzbx", false),
            ("*[!ab]x", "zzcx", true),
            ("*[a-c]", "b", true),
            ("*[c-a]", "b", false),        // backwards range: never matches
            ("*[", "x[", true),            // unclosed [ is literal
            ("*\\", "a\\", true),          // backslash is literal
            ("*[]]", "]", true),
            ("*[!]]", "]", false),
            ("*\n", "x\n", true),          // (?s): * spans newlines
            ("*é", "café", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(m(p, n), *want, "{p:?} vs {n:?}");
        }
    }

    #[test]
    fn exact_names_win_over_earlier_globs() {
        let table =
            vec![("video.*".to_string(), "media".to_string()), ("video.encode".to_string(), "encode".to_string())];
        let r = Router::new(&table, DEFAULT_QUEUE).unwrap();
        assert_eq!(r.route("video.encode").queue, "encode");
        assert_eq!(r.route("video.thumb.x").queue, "media");
        assert_eq!(r.route("other"), Decision { queue: "celery".into(), pattern: None });
        // Without '*' a key is an exact name, even with ? or [.
        let table = vec![("tasks.?dd".to_string(), "q".to_string())];
        let r = Router::new(&table, "default").unwrap();
        assert_eq!(r.route("tasks.add").queue, "default");
        assert_eq!(r.route("tasks.?dd").queue, "q");
    }

    fn tq(name: &str, created: i64, queue: &str, extra: &[&str], routes: &[(&str, Option<&str>)]) -> TaskQueue {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": name, "namespace": "prod", "creationTimestamp": jiff::Timestamp::from_second(created).unwrap().to_string()},
            "spec": {
                "queue": queue, "extraQueues": extra,
                "routes": routes.iter().map(|(p, q)| serde_json::json!({"pattern": p, "queue": q})).collect::<Vec<_>>(),
                "broker": {"urlSecretRef": {"name": "b"}},
                "worker": {"image": "i", "app": "app.worker"}
            }
        }))
        .unwrap()
    }

    #[test]
    fn table_order_and_conflicts() {
        let tqs = vec![
            tq(
                "general",
                100,
                "celery",
                &["reports", "notifications"],
                &[
                    ("app.worker.tasks.reports.*", Some("reports")),
                    ("app.worker.tasks.emails.*", Some("notifications")),
                ],
            ),
            tq("ai", 50, "ai_processing", &[], &[("app.worker.tasks.ai_tasks.*", None), ("app.worker.tasks.*", None)]),
            tq(
                "late",
                200,
                "late",
                &[],
                &[("app.worker.tasks.ai_tasks.*", None), ("app.exact_name", None), ("x.*", Some("other"))],
            ),
        ];
        let t = build_table(&tqs);
        let keys: Vec<&str> = t.entries.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            keys,
            [
                "app.exact_name",
                "app.worker.tasks.ai_tasks.*",
                "app.worker.tasks.reports.*",
                "app.worker.tasks.emails.*",
                "app.worker.tasks.*"
            ]
        );
        assert_eq!(t.rejected.len(), 2, "{:?}", t.rejected);
        assert_eq!(t.rejected[0].object, "prod/late");
        assert_eq!(t.rejected[0].reason, "pattern already claimed by TaskQueue prod/ai");
        assert!(t.rejected[1].reason.contains("\"other\" is not consumed"));
        let r = Router::new(&t.entries, DEFAULT_QUEUE).unwrap();
        assert_eq!(r.route("app.worker.tasks.ai_tasks.generate_user_profile").queue, "ai_processing");
        assert_eq!(r.route("app.worker.tasks.reports.monthly").queue, "reports");
        assert_eq!(r.route("app.worker.tasks.misc").queue, "ai_processing");
        let json = t.to_json();
        assert!(json.starts_with("[\n  [\"app.exact_name\",{\"queue\":\"late\"}],\n  [\"app.worker"), "{json}");
        let parsed: Vec<(String, serde_json::Value)> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.len(), 5);
        assert_eq!(Table::default().to_json(), "[]");
    }

    #[test]
    fn a_table_cut_into_parts_is_the_whole_table_in_order_and_each_part_fits() {
        let entries: Vec<(String, String)> =
            (0..500).map(|i| (format!("app.tasks.family_{i:04}.*"), format!("q{}", i % 7))).collect();
        let t = Table { entries, ..Table::default() };
        let whole: Vec<serde_json::Value> = serde_json::from_str(&t.to_json()).unwrap();
        for budget in [50, 1_000, 4_096, 20_000, 1 << 20] {
            let parts = t.to_json_parts(budget);
            let mut joined = Vec::new();
            for p in &parts {
                let list: Vec<serde_json::Value> = serde_json::from_str(p).unwrap();
                assert!(p.len() <= budget || list.len() == 1, "{budget}: a part of {} bytes", p.len());
                joined.extend(list);
            }
            assert_eq!(joined, whole, "budget {budget}");
            assert_eq!(parts.len() == 1, t.to_json().len() <= budget, "one part exactly when it fits: {budget}");
        }
        assert_eq!(t.to_json_parts(1 << 20), [t.to_json()]);
        assert_eq!(Table::default().to_json_parts(10), ["[]"]);
    }
}
