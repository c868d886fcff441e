//! Differential test: the Rust router against Python Celery's own `Router` (real Celery from the
//! test venv) on many generated (pattern, task name) cases, including dots, `?`, classes,
//! negated classes, ranges, unclosed `[`, backslashes, empty strings, unicode and several
//! patterns per table. Every answer must be identical.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use taskqueue_operator::routing::{Router, DEFAULT_QUEUE};

/// Small deterministic PRNG (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const PATTERN_PIECES: &[&str] = &[
    "a", "b", "c", ".", "*", "*", "?", "[", "]", "!", "-", "\\", "^", "é", "\n", "Z", "&", "app.", "tasks", "[a-c]",
    "[!b]", "[z-a]",
];
const NAME_PIECES: &[&str] =
    &["a", "b", "c", ".", "-", "\\", "[", "]", "!", "é", "\n", "Z", "^", "*", "?", "app.", "tasks", ""];

fn word(rng: &mut Rng, pieces: &[&str], max: usize) -> String {
    (0..rng.below(max + 1)).map(|_| rng.pick(pieces)).collect()
}

/// A name likely to match `pattern`: its literal text with wildcards filled in.
fn near_miss(rng: &mut Rng, pattern: &str) -> String {
    pattern
        .chars()
        .map(|c| match c {
            '*' => word(rng, NAME_PIECES, 2),
            '?' => rng.pick(&["a", "b", "é", "\n"]).to_string(),
            other => other.to_string(),
        })
        .collect()
}

fn cases(n: usize) -> Vec<Value> {
    let mut rng = Rng(0x5EED_CE1E_47A5_u64);
    let mut out = vec![
        // Hand-picked: the reference's end-to-end table and fnmatch corner cases.
        json!({"routes": [["video.*", "media"], ["video.encode", "encode"], ["*.import", "imports"]],
               "names": ["video.encode", "video.thumb.x", "data.import", "other.task", ""]}),
        json!({"routes": [["tasks.?dd", "exact"], ["tasks.*dd", "glob"]], "names": ["tasks.add", "tasks.?dd", "tasks.dd"]}),
        json!({"routes": [["*[", "a"], ["*[]]", "b"], ["*[!]]", "c"], ["*[!]", "d"], ["*\\", "e"]],
               "names": ["x[", "]", "!", "x[!]", "a\\", "\\", ""]}),
        json!({"routes": [["*[a-c-e]", "a"], ["*[--a]", "b"], ["*[a--]", "c"], ["*[c-a-b]", "d"], ["*[]-a]", "e"]],
               "names": ["b", "-", "d", "e", "^", "_", "]", "a", "c"]}),
        json!({"routes": [["", "empty"], ["*", "all"]], "names": ["", "x", "\n"]}),
    ];
    while out.len() < n {
        let mut routes: Vec<(String, String)> = Vec::new();
        for i in 0..1 + rng.below(4) {
            let p = word(&mut rng, PATTERN_PIECES, 6);
            if !routes.iter().any(|(q, _)| *q == p) {
                routes.push((p, format!("q{i}")));
            }
        }
        let mut names: Vec<String> = (0..4).map(|_| word(&mut rng, NAME_PIECES, 6)).collect();
        for (p, _) in &routes {
            names.push(near_miss(&mut rng, p));
            names.push(near_miss(&mut rng, p));
        }
        out.push(json!({"routes": routes, "names": names}));
    }
    out
}

#[test]
#[ignore = "needs the Celery venv: make test"]
fn rust_router_answers_exactly_like_celery() {
    let venv = std::env::var("TQ_VENV").expect("TQ_VENV (deploy/local/up.sh) points at the Celery venv");
    let cases = cases(3000);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/celery_routes.py");
    let mut child = Command::new(format!("{venv}/bin/python"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python from the venv");
    let input = serde_json::to_vec(&json!({"cases": cases})).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "celery_routes.py failed");
    let celery: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();

    let (mut compared, mut errors, mut matched) = (0, 0, 0);
    let mut mismatches = Vec::new();
    for (case, answer) in cases.iter().zip(&celery) {
        let table: Vec<(String, String)> = serde_json::from_value(case["routes"].clone()).unwrap();
        let names: Vec<String> = serde_json::from_value(case["names"].clone()).unwrap();
        match (Router::new(&table, DEFAULT_QUEUE), answer.get("queues")) {
            (Err(_), None) => errors += 1,
            (Ok(router), Some(queues)) => {
                for (name, want) in names.iter().zip(queues.as_array().unwrap()) {
                    let got = router.route(name).queue;
                    compared += 1;
                    if got != DEFAULT_QUEUE {
                        matched += 1;
                    }
                    if got != want.as_str().unwrap() {
                        mismatches.push(format!("table {table:?} task {name:?}: rust {got:?}, celery {want}"));
                    }
                }
            }
            (rust, _) => mismatches.push(format!("table {table:?}: rust {:?}, celery {answer}", rust.err())),
        }
    }
    println!("compared {compared} (table, task name) routings in {} tables against Celery: {matched} matched a route, {errors} tables Celery itself rejects", cases.len());
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    assert!(compared > 20_000 && matched > 2_000, "the generator must exercise both outcomes");
}

/// The CLI's table, loaded by a real Celery app exactly as the README says
/// (`task_routes = (json.load(open(path)),)`), sends the seed's task names to the expected
/// Redis lists.
#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn celery_loading_the_table_sends_each_task_to_the_routed_list() {
    let redis = support::Redis::start().await;
    let bin = env!("CARGO_BIN_EXE_taskqueue-operator");
    let seed = support::repo().join("deploy/examples/seed.yaml");
    let out = Command::new(bin).arg("routes").arg("-f").arg(&seed).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = std::env::temp_dir().join(format!("task_routes-{}.json", redis.port));
    std::fs::write(&table, &out.stdout).unwrap();

    let sends: &[(&str, &str)] = &[
        ("app.worker.tasks.ai_tasks.generate_user_profile", "2"),
        ("app.worker.tasks.demo_tasks.send_welcome_email", "3"),
        ("app.worker.tasks.reports.build_monthly_report", "4"),
        ("app.worker.tasks.emails.send_newsletter", "5"),
        ("app.worker.tasks.urgent.page_oncall", "6"),
    ];
    for (task, n) in sends {
        let status = support::python(&redis.url())
            .env("TASK_ROUTES_FILE", &table)
            .arg(support::repo().join("deploy/demo/produce.py"))
            .args(["send", task, n])
            .status()
            .unwrap();
        assert!(status.success());
    }
    // What `route` predicts, and what Redis holds.
    let names: Vec<&str> = sends.iter().map(|(t, _)| *t).collect();
    let out = Command::new(bin).arg("route").arg("-f").arg(&seed).arg("--").args(&names).output().unwrap();
    let predicted: Vec<String> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| l.split('\t').nth(1).unwrap().to_string()).collect();
    assert_eq!(predicted, ["ai_processing", "demo_tasks", "reports", "notifications", "urgent"]);
    let queues = ["ai_processing", "demo_tasks", "reports", "notifications", "urgent", "celery"];
    let mut args = vec!["depth".to_string(), "--broker-url".into(), redis.url()];
    for q in queues {
        args.extend(["--queue".to_string(), q.to_string()]);
    }
    let out = Command::new(bin).args(&args).output().unwrap();
    let observed: Vec<(String, i64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["queue"].as_str().unwrap().to_string(), v["pending"].as_i64().unwrap())
        })
        .collect();
    println!("task -> Redis list observed: {observed:?}");
    let want: Vec<(String, i64)> =
        [("ai_processing", 2), ("demo_tasks", 3), ("reports", 4), ("notifications", 5), ("urgent", 6), ("celery", 0)]
            .iter()
            .map(|(q, n)| (q.to_string(), *n))
            .collect();
    assert_eq!(observed, want);
    let _ = std::fs::remove_file(table);
}

/// A file laid out as the kubelet lays out a ConfigMap volume: `task_routes.json` ->
/// `..data/task_routes.json`, `..data` -> `..VERSION`; a new version is swapped in by renaming a
/// new `..data` symlink over the old one (atomic, as the kubelet's AtomicWriter does).
fn kubelet_writes(dir: &std::path::Path, version: &str, table: &str) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("task_routes.json"), table).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(dir.join("task_routes.json")).is_err() {
        symlink("..data/task_routes.json", dir.join("task_routes.json")).unwrap();
    }
}

/// The example router (deploy/examples/taskqueue_routes.py) in one real Celery producer that
/// never restarts: no table yet (the volume mounted optional) sends to the default queue; the
/// table appearing, then changing, moves the same task name to the new queue; a table that
/// does not parse keeps the last good one. Each checked by the Redis list the message lands in.
#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn the_example_router_follows_a_changed_table_without_a_restart() {
    use std::io::{BufRead, Write};
    let redis = support::Redis::start().await;
    let dir = std::env::temp_dir().join(format!("celery-routes-{}", redis.port));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut producer = support::python(&redis.url())
        .env("CHECK_EVERY", "0.2")
        .arg(support::repo().join("tests/celery_reload.py"))
        .arg(dir.join("task_routes.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(producer.stdout.take().unwrap());
    let redis_url = redis.url();
    let mut send = move || {
        std::thread::sleep(std::time::Duration::from_millis(400)); // past CHECK_EVERY
        writeln!(stdin, "app.worker.tasks.reports.monthly").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "sent");
        let depths: Vec<i64> =
            ["celery", "first", "second"].iter().map(|q| support::kombu_count(&redis_url, q)).collect();
        depths
    };
    assert_eq!(send(), [1, 0, 0], "no table yet: Celery's default queue");
    kubelet_writes(&dir, "v1", r#"[["app.worker.tasks.reports.*", {"queue": "first"}]]"#);
    assert_eq!(send(), [1, 1, 0], "the table appeared");
    kubelet_writes(&dir, "v2", r#"[["app.worker.tasks.reports.*", {"queue": "second"}]]"#);
    assert_eq!(send(), [1, 1, 1], "the table changed: same process, new queue");
    kubelet_writes(&dir, "v3", "not json");
    assert_eq!(send(), [1, 1, 2], "a table that does not parse keeps the last good one");
    let _ = producer.kill();
    let _ = producer.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
