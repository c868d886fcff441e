//! A Deployment the operator scales but did not write (`spec.scaleTargetRef`), read (pure).
//!
//! The operator sets only its `spec.replicas` and its pods' deletion costs. What it relies on
//! lives in the app's own template, so it is read from there: which container runs
//! `celery worker`, the queues it consumes, its concurrency, how its workers are named (heartbeats
//! are matched to pods by `<name>@<pod name>`) and whether they send heartbeats at all. What does
//! not fit is reported in `WorkerMatches`; scaling goes on (the app's owners decide).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::celery_args::{read_worker, WorkerCommand};
use crate::crd::ScaleTargetRef;
use crate::validate::{ValidSpec, DEFAULT_NODE_NAME};

/// What the target's worker command says, and what does not fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetCheck {
    /// The container that runs `celery worker`, when one does.
    pub container: Option<String>,
    /// Whether a worker command was found in the template (not, e.g., in the image's entrypoint).
    pub read: bool,
    /// The worker name before `@` (Celery's `celery` without `-n`).
    pub node_name: String,
    /// `-c`, when the command sets it.
    pub concurrency: Option<i64>,
    /// What does not fit, each naming the flag or field and the fix.
    pub problems: Vec<String>,
    /// What was read, for the condition when all fits.
    pub summary: String,
}

const SHELLS: &[&str] = &["sh", "bash", "dash", "ash", "zsh"];

/// The words a container runs: command then args; a shell's `-c` script split on blanks (quotes
/// dropped). The second value says whether the worker runs under a shell without `exec`.
fn container_words(c: &Container) -> (Vec<String>, bool) {
    let words: Vec<String> = c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect();
    let shell = words.first().and_then(|w| w.rsplit('/').next()).is_some_and(|w| SHELLS.contains(&w));
    match (shell, words.get(1).map(String::as_str), words.get(2)) {
        (true, Some("-c"), Some(script)) => {
            let split: Vec<String> = script
                .split(|c: char| c.is_whitespace() || c == ';' || c == '&' || c == '|')
                .map(|w| w.trim_matches(|c| c == '"' || c == '\''))
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect();
            let celery = split.iter().position(|w| w == "celery" || w.ends_with("/celery"));
            let exec = celery.is_some_and(|i| split[..i].iter().any(|w| w == "exec"));
            (split, !exec)
        }
        _ => (words, false),
    }
}

/// Read Deployment `d` for `target`, against the queues the TaskQueue counts.
/// `tasks_per_replica_set`: whether `spec.scaling.tasksPerReplica` is given (else `-c` sizes).
pub fn check(d: &Deployment, target: &ScaleTargetRef, queues: &[String], tasks_per_replica_set: bool) -> TargetCheck {
    let mut out = TargetCheck { node_name: DEFAULT_NODE_NAME.into(), ..TargetCheck::default() };
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).cloned().unwrap_or_default();
    let container = match &target.container {
        Some(wanted) => match pod.containers.iter().find(|c| &c.name == wanted) {
            Some(c) => Some(c),
            None => {
                let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
                out.problems.push(format!(
                    "spec.scaleTargetRef.container: Deployment {name} has no container {wanted:?} (it has {}); name \
                     the one that runs `celery worker`",
                    names.join(", ")
                ));
                None
            }
        },
        None => pod
            .containers
            .iter()
            .find(|c| read_worker(&container_words(c).0).is_some())
            .or(pod.containers.first().filter(|_| pod.containers.len() == 1)),
    };
    pod_naming(&pod, &mut out.problems);
    let Some(c) = container else {
        out.summary = format!(
            "no container of Deployment {name} runs `celery worker` in its command or args; queues, concurrency and \
             worker names are not checked"
        );
        return out;
    };
    out.container = Some(c.name.clone());
    let (words, shell_without_exec) = container_words(c);
    let Some(cmd) = read_worker(&words) else {
        out.summary = format!(
            "container {} of Deployment {name} does not show `celery worker` in its command or args (the image's \
             entrypoint may run it); queues, concurrency and worker names are not checked",
            c.name
        );
        return out;
    };
    out.read = true;
    if shell_without_exec {
        out.problems.push(format!(
            "container {}: the worker runs under a shell's -c without `exec`: SIGTERM reaches the shell, not Celery, so \
             a scale-in kills running tasks; start the worker with `exec celery ...` or use exec form",
            c.name
        ));
    }
    command_problems(&cmd, queues, tasks_per_replica_set, &mut out);
    out.summary = summary(&c.name, &cmd, &out);
    out
}

/// Template fields that give a pod a hostname other than its name: heartbeats would not match pods.
fn pod_naming(pod: &PodSpec, problems: &mut Vec<String>) {
    let fixed = [
        (pod.hostname.is_some(), "hostname"),
        (pod.set_hostname_as_fqdn == Some(true), "setHostnameAsFQDN: true"),
        (pod.host_network == Some(true), "hostNetwork: true"),
    ];
    for (_, field) in fixed.iter().filter(|(set, _)| *set) {
        problems.push(format!(
            "the pod template sets {field}: the workers' hostnames are then not their pod names, so the operator cannot \
             tell which pod runs which worker (deletion costs stay 0); remove it"
        ));
    }
}

fn command_problems(cmd: &WorkerCommand, queues: &[String], tasks_per_replica_set: bool, out: &mut TargetCheck) {
    let p = &mut out.problems;
    match &cmd.queues {
        None if queues != ["celery"] => p.push(format!(
            "the worker command has no -Q: the workers consume the app's default queue (`celery` unless the app sets \
             task_default_queue), while this TaskQueue counts {}; add `-Q {}` to the command",
            queues.join(", "),
            queues.join(",")
        )),
        None => {}
        Some(consumed) => {
            let missing: Vec<&str> = queues.iter().filter(|q| !consumed.contains(q)).map(String::as_str).collect();
            if !missing.is_empty() {
                p.push(format!(
                    "the workers do not consume {} (their -Q is {}): the operator scales them for work they never \
                     take; add it to -Q, or remove it from spec.queue/spec.extraQueues",
                    missing.join(", "),
                    consumed.join(",")
                ));
            }
            let extra: Vec<&str> = consumed.iter().filter(|q| !queues.contains(q)).map(String::as_str).collect();
            if !extra.is_empty() {
                p.push(format!(
                    "the workers also consume {}, which this TaskQueue does not count: add it to spec.extraQueues",
                    extra.join(", ")
                ));
            }
        }
    }
    let excluded: Vec<&str> = cmd.exclude.iter().filter(|q| queues.contains(q)).map(String::as_str).collect();
    if !excluded.is_empty() {
        p.push(format!(
            "the worker command excludes {} (-X) which this TaskQueue counts; remove it from -X",
            excluded.join(", ")
        ));
    }
    match cmd.concurrency.as_deref().map(|c| c.parse::<i64>()) {
        Some(Ok(n)) if n >= 1 => out.concurrency = Some(n),
        Some(_) => p.push(format!(
            "-c {:?} is not a process count; use a whole number",
            cmd.concurrency.as_deref().unwrap_or_default()
        )),
        None if !tasks_per_replica_set => p.push(
            "the worker command has no -c (Celery then starts one process per CPU of the node) and \
             spec.scaling.tasksPerReplica is not set: replicas are sized as if each ran 1 task; set -c or \
             tasksPerReplica"
                .into(),
        ),
        None => {}
    }
    if cmd.autoscale {
        p.push("--autoscale: Celery's own autoscaler changes the processes under the operator; use a fixed -c".into());
    }
    if cmd.without_heartbeat {
        p.push(
            "--without-heartbeat: the operator cannot tell busy pods from idle ones (every deletion cost stays 0) nor \
             hear the pool; remove it"
                .into(),
        );
    }
    if cmd.beat {
        p.push("-B runs beat in every replica, so each pod sends every periodic task; run `celery beat` as its own Deployment".into());
    }
    if cmd.detach {
        p.push("-D detaches the worker: the container's process exits at once; remove it".into());
    }
    match cmd.hostname.as_deref().map(|h| h.split_once('@')) {
        None => {}
        Some(Some((name, host))) if !name.is_empty() && !name.contains('%') && matches!(host, "%h" | "%n") => {
            out.node_name = name.to_string();
        }
        Some(_) => p.push(format!(
            "-n {:?} does not name each worker after its pod: use `-n <name>@%h` (the operator finds each pod's worker \
             by `<name>@<pod name>`)",
            cmd.hostname.as_deref().unwrap_or_default()
        )),
    }
}

fn summary(container: &str, cmd: &WorkerCommand, out: &TargetCheck) -> String {
    let consumed = cmd.queues.as_ref().map_or_else(|| "the default queue".to_string(), |q| q.join(","));
    let c = out.concurrency.map_or_else(|| "Celery's default concurrency".to_string(), |n| format!("concurrency {n}"));
    format!(
        "container {container} runs `celery worker` on {consumed} with {c}; its workers are named {}@<pod name> and \
         send heartbeats",
        out.node_name
    )
}

/// Fill in what a valid spec with `scaleTargetRef` leaves to the target's command: the worker
/// name, and `tasksPerReplica` from `-c` (1 when neither says).
pub fn resolve(valid: &mut ValidSpec, check: &TargetCheck) {
    valid.node_name = check.node_name.clone();
    if valid.tasks_per_replica_from_target {
        valid.tasks_per_replica = check.concurrency.unwrap_or(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(pod: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "app-worker"},
            "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": {"spec": pod}}
        }))
        .unwrap()
    }

    fn target(container: Option<&str>) -> ScaleTargetRef {
        ScaleTargetRef { name: "app-worker".into(), container: container.map(String::from) }
    }

    fn queues(q: &[&str]) -> Vec<String> {
        q.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_fitting_worker_gives_its_name_and_concurrency() {
        let d = deployment(json!({"containers": [
            {"name": "proxy", "image": "envoy"},
            {"name": "app", "image": "app:1", "command": ["ddtrace-run", "celery"], "args": ["-A", "app", "worker", "-Q", "mail,sms", "-c", "6", "-n", "mail@%h"]}
        ]}));
        let c = check(&d, &target(None), &queues(&["mail", "sms"]), false);
        assert_eq!(c.problems, Vec::<String>::new());
        assert_eq!(
            (c.container.as_deref(), c.read, c.node_name.as_str(), c.concurrency),
            (Some("app"), true, "mail", Some(6))
        );
        assert!(c.summary.contains("mail,sms with concurrency 6"), "{}", c.summary);
        let mut v = crate::validate::validate(
            &serde_json::from_value(json!({"queue": "mail", "extraQueues": ["sms"], "broker": {"urlSecretRef": {"name": "b"}}, "scaleTargetRef": {"name": "app-worker"}})).unwrap(),
            "mail",
        )
        .unwrap();
        assert_eq!(
            (v.tasks_per_replica, v.tasks_per_replica_from_target, v.deployment.as_str()),
            (1, true, "app-worker")
        );
        resolve(&mut v, &c);
        assert_eq!((v.tasks_per_replica, v.node_name.as_str()), (6, "mail"));
    }

    #[test]
    fn each_mismatch_is_named() {
        let cases: &[(serde_json::Value, &[&str], &str)] = &[
            (json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2"]), &["mail", "sms"], "do not consume sms"),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail,other", "-c", "2"]), &["mail"], "also consume other"),
            (json!(["celery", "-A", "a", "worker", "-c", "2"]), &["mail"], "has no -Q"),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail", "-X", "mail", "-c2"]), &["mail"], "excludes mail"),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail"]), &["mail"], "has no -c"),
            (
                json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2", "--autoscale=8,2"]),
                &["mail"],
                "--autoscale",
            ),
            (
                json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2", "--without-heartbeat"]),
                &["mail"],
                "--without-heartbeat",
            ),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2", "-B"]), &["mail"], "-B runs beat"),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2", "-n", "fixed"]), &["mail"], "-n \"fixed\""),
            (json!(["celery", "-A", "a", "worker", "-Q", "mail", "-c", "2", "-n", "w@%d"]), &["mail"], "-n \"w@%d\""),
            (json!(["sh", "-c", "cd /app && celery -A a worker -Q mail -c 2"]), &["mail"], "without `exec`"),
        ];
        for (command, q, want) in cases {
            let d = deployment(json!({"containers": [{"name": "w", "image": "i", "command": command}]}));
            let c = check(&d, &target(None), &queues(q), false);
            assert!(c.read, "{command}");
            assert_eq!(c.problems.len(), 1, "{command}: {:?}", c.problems);
            assert!(c.problems[0].contains(want), "{command}: {:?}", c.problems);
        }
        let fine = deployment(
            json!({"containers": [{"name": "w", "image": "i", "command": ["sh", "-c", "cd /app && exec celery -A a worker -Q celery"]}]}),
        );
        assert_eq!(
            check(&fine, &target(None), &queues(&["celery"]), true).problems,
            Vec::<String>::new(),
            "exec, default queue, tasksPerReplica set"
        );
    }

    #[test]
    fn what_cannot_be_read_is_said_and_the_pod_naming_still_checked() {
        let d = deployment(json!({"hostNetwork": true, "containers": [{"name": "w", "image": "app:1"}]}));
        let c = check(&d, &target(None), &queues(&["mail"]), false);
        assert!(!c.read && c.summary.contains("does not show `celery worker`"), "{c:?}");
        assert_eq!(c.problems.len(), 1);
        assert!(c.problems[0].contains("hostNetwork"));
        let c = check(&d, &target(Some("nope")), &queues(&["mail"]), false);
        assert!(c.problems.iter().any(|p| p.contains("no container \"nope\" (it has w)")), "{c:?}");
        assert_eq!(c.node_name, "celery");
    }
}
