//! The CLI as a user runs it (no cluster needed).

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn crd_prints_the_committed_file() {
    let (ok, out, _) = run(&["crd"]);
    assert!(ok);
    assert_eq!(out, std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/taskqueue.yaml")).unwrap());
}

#[test]
fn routes_and_route_read_the_seed_manifests() {
    let (ok, out, err) = run(&["routes", "-f", "deploy/examples/seed.yaml"]);
    assert!(ok, "{err}");
    let table: Vec<(String, serde_json::Value)> = serde_json::from_str(&out).unwrap();
    assert_eq!(table.len(), 5);
    let (ok, out, _) = run(&[
        "route",
        "-f",
        "deploy/examples",
        "--default-queue",
        "fallback",
        "--",
        "app.worker.tasks.ai_tasks.run_ai_text_generation",
        "-starts-with-dash",
    ]);
    assert!(ok);
    assert_eq!(
        out,
        "app.worker.tasks.ai_tasks.run_ai_text_generation\tai_processing\tapp.worker.tasks.ai_tasks.*\n-starts-with-dash\tfallback\t-\n"
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (ok, _, err) = run(&["depth", "--broker-url", "amqp://guest:hunter2@rabbit//", "--queue", "q"]);
    assert!(!ok);
    assert!(err.contains("scheme \"amqp\" is not supported") && !err.contains("hunter2"), "{err}");
    let (ok, _, err) = run(&["routes", "-f", "no/such/file.yaml"]);
    assert!(!ok);
    assert!(err.starts_with("error: no/such/file.yaml:"), "{err}");
}
