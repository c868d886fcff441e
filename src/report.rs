//! `taskqueue-operator status`: one line per TaskQueue from its stored status (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::crd::TaskQueue;

/// Conditions that are fine when True; the others (`ScalingLimited`, `Paused`, `QueueShared`)
/// are worth a look when True.
const GOOD_WHEN_TRUE: &[&str] = &[
    "Ready",
    "SpecValid",
    "BrokerReachable",
    "DeploymentOwned",
    "RoutesAccepted",
    "WorkersHeard",
    "WorkerMatches",
    "KeysMatch",
];

/// The conditions of `tq` that are not OK, as `Type=Status(Reason)`.
pub fn not_ok(tq: &TaskQueue) -> Vec<String> {
    let conditions = tq.status.as_ref().map_or(&[][..], |s| s.conditions.as_slice());
    not_ok_conditions(conditions).map(|c| format!("{}={}({})", c.type_, c.status, c.reason)).collect()
}

/// The conditions that are not OK: False or Unknown where True is fine, True where it is worth
/// a look (the page, `status`, the `taskqueue_not_ok` metric and the alerts agree on this).
pub fn not_ok_conditions(conditions: &[Condition]) -> impl Iterator<Item = &Condition> {
    conditions.iter().filter(|c| (c.status == "True") != GOOD_WHEN_TRUE.contains(&c.type_.as_str()))
}

/// A table with a header: namespace (with `all_namespaces`), name, queue, pending, in-flight,
/// scheduled, desired/ready, the last scale reason and the conditions that are not OK.
pub fn status_table(tqs: &[TaskQueue], all_namespaces: bool) -> String {
    let dash = || "-".to_string();
    let num = |n: Option<i64>| n.map_or_else(dash, |n| n.to_string());
    let mut rows: Vec<Vec<String>> = vec![[
        "NAMESPACE",
        "NAME",
        "QUEUE",
        "PENDING",
        "IN-FLIGHT",
        "SCHEDULED",
        "DESIRED/READY",
        "LAST SCALE",
        "NOT OK",
    ]
    .map(String::from)
    .to_vec()];
    for tq in tqs {
        let s = tq.status.clone().unwrap_or_default();
        let replicas = format!(
            "{}/{}",
            s.desired_replicas.map_or_else(dash, |n| n.to_string()),
            s.ready_replicas.map_or_else(dash, |n| n.to_string())
        );
        let problems = not_ok(tq);
        rows.push(vec![
            tq.metadata.namespace.clone().unwrap_or_default(),
            tq.metadata.name.clone().unwrap_or_default(),
            tq.spec.queue.clone(),
            num(s.pending),
            num(s.in_flight),
            num(s.scheduled),
            replicas,
            s.last_scale_reason.unwrap_or_else(dash),
            if problems.is_empty() { dash() } else { problems.join(",") },
        ]);
    }
    if !all_namespaces {
        rows.iter_mut().for_each(|r| {
            r.remove(0);
        });
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tq(name: &str, status: serde_json::Value) -> TaskQueue {
        serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": name, "namespace": "prod"},
            "spec": {"queue": format!("{name}_q"), "broker": {"urlSecretRef": {"name": "b"}},
                     "worker": {"image": "app:1", "app": "app.worker", "concurrency": 2}},
            "status": status
        }))
        .unwrap()
    }

    fn cond(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        json!({"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"})
    }

    #[test]
    fn one_line_per_taskqueue_with_what_is_not_ok() {
        let fine = tq(
            "ai",
            json!({"pending": 8, "inFlight": 2, "scheduled": 0, "desiredReplicas": 5, "readyReplicas": 5,
            "lastScaleReason": "scaled up 1 -> 5: 8 pending + 2 in flight / 2 per replica",
            "conditions": [cond("Ready", "True", "WorkersReady"), cond("ScalingLimited", "False", "FollowsDemand")]}),
        );
        let broken = tq(
            "mail",
            json!({"desiredReplicas": 3, "readyReplicas": 1,
            "conditions": [cond("Ready", "False", "BrokerNotRead"), cond("BrokerReachable", "False", "BrokerUnreachable"),
                           cond("Paused", "True", "Annotated")]}),
        );
        let fresh = tq("new", json!(null));
        assert_eq!(
            status_table(&[fine, broken, fresh.clone()], false),
            "NAME  QUEUE   PENDING  IN-FLIGHT  SCHEDULED  DESIRED/READY  LAST SCALE                                                 NOT OK\n\
             ai    ai_q    8        2          0          5/5            scaled up 1 -> 5: 8 pending + 2 in flight / 2 per replica  -\n\
             mail  mail_q  -        -          -          3/1            -                                                          \
             Ready=False(BrokerNotRead),BrokerReachable=False(BrokerUnreachable),Paused=True(Annotated)\n\
             new   new_q   -        -          -          -/-            -                                                          -\n"
        );
        assert!(status_table(&[fresh], true).starts_with("NAMESPACE  NAME  QUEUE"));
    }
}
