//! Operator-side validation of a TaskQueue spec (pure).
//!
//! The CRD schema and CEL rules catch most mistakes at admission time, but clusters older than
//! 1.25 drop CEL rules and objects written before a CRD upgrade skip admission, so every rule is
//! checked here too. The result is either a [`ValidSpec`] with everything parsed, or a list of
//! errors that each name the field and the fix.

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;

use crate::crd::TaskQueueSpec;

/// A spec that passed validation, with strings parsed into the types the controller uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub count_in_flight: bool,
    /// `spec.queue` followed by `spec.extraQueues`, in order.
    pub queues: Vec<String>,
    pub node_name: String,
    pub poll_interval: Duration,
    pub stabilization_window: Duration,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub tasks_per_replica: i64,
    pub activation_threshold: i64,
    pub scale_up_max_step: Option<i32>,
    pub scale_down_max_step: Option<i32>,
    /// `fallbackReplicas` and `fallbackAfter`, when set.
    pub fallback: Option<(i32, Duration)>,
    pub pod_template: Option<PodTemplateSpec>,
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of one spec, joined for a condition message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec(pub Vec<FieldError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

const MIN_POLL: Duration = Duration::from_millis(100);

pub fn validate(spec: &TaskQueueSpec, object_name: &str) -> Result<ValidSpec, InvalidSpec> {
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| errors.push(FieldError { field: field.into(), message });

    check_queue_name(&spec.queue, "spec.queue", &mut err);
    for (i, q) in spec.extra_queues.iter().enumerate() {
        let field = format!("spec.extraQueues[{i}]");
        check_queue_name(q, &field, &mut err);
        if q == &spec.queue {
            err(&field, format!("repeats spec.queue {q:?}; remove it from extraQueues"));
        } else if spec.extra_queues[..i].contains(q) {
            err(&field, format!("{q:?} is listed twice; remove the duplicate"));
        }
    }
    let queues: Vec<String> = std::iter::once(spec.queue.clone()).chain(spec.extra_queues.iter().cloned()).collect();

    for (i, route) in spec.routes.iter().enumerate() {
        let field = format!("spec.routes[{i}].pattern");
        if route.pattern.is_empty() {
            err(&field, "must not be empty; use a task name or a glob such as `app.tasks.*`".into());
        } else if route.pattern.chars().count() > 253 {
            err(&field, "is longer than 253 characters; shorten the pattern".into());
        } else if route.pattern.chars().any(char::is_control) {
            err(&field, "contains a control character; remove it".into());
        } else if route.pattern.contains('*') {
            if let Err(e) = crate::routing::Glob::new(&route.pattern) {
                err(&field, format!("Celery cannot compile this glob ({e}); fix the [...] class"));
            }
        }
        if let Some(q) = &route.queue {
            if !queues.contains(q) {
                err(
                    &format!("spec.routes[{i}].queue"),
                    format!(
                        "{q:?} is not consumed by this pool; use spec.queue or one of spec.extraQueues ({})",
                        queues.join(", ")
                    ),
                );
            }
        }
    }

    let opts = &spec.broker.transport_options;
    if spec.broker.url_secret_ref.name.is_empty() {
        err("spec.broker.urlSecretRef.name", "must name the Secret holding the broker URL".into());
    }
    if spec.broker.url_secret_ref.key.is_empty() {
        err("spec.broker.urlSecretRef.key", "must name the Secret key holding the broker URL (e.g. `url`)".into());
    }
    if opts.priority_steps.is_empty() {
        err(
            "spec.broker.transportOptions.prioritySteps",
            "must list at least one step; kombu's default is [0, 3, 6, 9]".into(),
        );
    }
    for (i, s) in opts.priority_steps.iter().enumerate() {
        if *s > 9 {
            err(
                &format!("spec.broker.transportOptions.prioritySteps[{i}]"),
                format!("{s} is outside kombu's range 0..9"),
            );
        } else if opts.priority_steps[..i].contains(s) {
            err(
                &format!("spec.broker.transportOptions.prioritySteps[{i}]"),
                format!("{s} is listed twice; remove the duplicate"),
            );
        }
    }
    if opts.sep.is_empty() {
        err("spec.broker.transportOptions.sep", "must not be empty; kombu's default is \"\\u0006\\u0016\"".into());
    }

    let w = &spec.worker;
    if w.image.trim().is_empty() {
        err("spec.worker.image", "must name the container image with the Celery app".into());
    }
    if w.app.trim().is_empty() || w.app.chars().any(char::is_whitespace) {
        err("spec.worker.app", format!("{:?} is not a Celery app for `celery -A`; use e.g. `app.worker`", w.app));
    }
    if w.concurrency < 1 {
        err("spec.worker.concurrency", format!("{} must be at least 1", w.concurrency));
    }
    if let Some(p) = w.prefetch_multiplier {
        if p < 1 {
            err(
                "spec.worker.prefetchMultiplier",
                format!("{p} must be at least 1 (or omit it for Celery's default 4)"),
            );
        }
    }
    let node_name = w.node_name.clone().unwrap_or_else(|| object_name.to_string());
    if node_name.is_empty() || node_name.contains('@') || node_name.chars().any(char::is_whitespace) {
        err(
            "spec.worker.nodeName",
            format!("{node_name:?} must be non-empty without '@' or spaces; the operator appends `@%h`"),
        );
    }
    if let Some(g) = w.termination_grace_period_seconds {
        if g < 0 {
            err("spec.worker.terminationGracePeriodSeconds", format!("{g} must not be negative"));
        }
    }
    for (i, e) in w.env.iter().enumerate() {
        if e.name == "CELERY_BROKER_URL" {
            err(
                &format!("spec.worker.env[{i}].name"),
                "CELERY_BROKER_URL is set by the operator from spec.broker.urlSecretRef; remove it".into(),
            );
        }
    }
    let pod_template = match &w.pod_template {
        None => None,
        Some(v) => match serde_json::from_value::<PodTemplateSpec>(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                err("spec.worker.podTemplate", format!("is not a valid partial PodTemplateSpec: {e}"));
                None
            }
        },
    };

    let s = &spec.scaling;
    if s.min_replicas < 0 {
        err("spec.scaling.minReplicas", format!("{} must not be negative", s.min_replicas));
    }
    if s.max_replicas < 0 {
        err("spec.scaling.maxReplicas", format!("{} must not be negative", s.max_replicas));
    }
    if s.min_replicas > s.max_replicas {
        err(
            "spec.scaling.minReplicas",
            format!(
                "{} must not exceed spec.scaling.maxReplicas ({}); lower minReplicas or raise maxReplicas",
                s.min_replicas, s.max_replicas
            ),
        );
    }
    if let Some(t) = s.tasks_per_replica {
        if t < 1 {
            err(
                "spec.scaling.tasksPerReplica",
                format!("{t} must be at least 1 (or omit it to use worker.concurrency)"),
            );
        }
    }
    if s.activation_threshold < 0 {
        err("spec.scaling.activationThreshold", format!("{} must not be negative", s.activation_threshold));
    }
    let poll_interval = parse_duration(&s.poll_interval, "spec.scaling.pollInterval", &mut err);
    if let Some(p) = poll_interval {
        if p < MIN_POLL {
            err("spec.scaling.pollInterval", format!("{:?} is below the minimum 100ms", s.poll_interval));
        }
    }
    let window =
        parse_duration(&s.scale_down.stabilization_window, "spec.scaling.scaleDown.stabilizationWindow", &mut err);
    for (field, step) in [
        ("spec.scaling.scaleUp.maxStep", s.scale_up.max_step),
        ("spec.scaling.scaleDown.maxStep", s.scale_down.max_step),
    ] {
        if let Some(n) = step.filter(|n| *n < 1) {
            err(field, format!("{n} must be at least 1 (or omit it for no limit)"));
        }
    }
    let fallback_after = parse_duration(&s.fallback_after, "spec.scaling.fallbackAfter", &mut err);
    if let Some(f) = s.fallback_replicas {
        if f < s.min_replicas || f > s.max_replicas {
            err(
                "spec.scaling.fallbackReplicas",
                format!(
                    "{f} is outside [minReplicas {}, maxReplicas {}]; pick a count within the bounds",
                    s.min_replicas, s.max_replicas
                ),
            );
        }
    }

    if !errors.is_empty() {
        return Err(InvalidSpec(errors));
    }
    Ok(ValidSpec {
        count_in_flight: s.count_in_flight,
        queues,
        node_name,
        poll_interval: poll_interval.unwrap_or(MIN_POLL),
        stabilization_window: window.unwrap_or_default(),
        min_replicas: s.min_replicas,
        max_replicas: s.max_replicas,
        tasks_per_replica: i64::from(s.tasks_per_replica.unwrap_or(w.concurrency)),
        activation_threshold: s.activation_threshold,
        scale_up_max_step: s.scale_up.max_step,
        scale_down_max_step: s.scale_down.max_step,
        fallback: s.fallback_replicas.zip(fallback_after),
        pod_template,
    })
}

fn check_queue_name(q: &str, field: &str, err: &mut impl FnMut(&str, String)) {
    if q.is_empty() {
        err(field, "must not be empty; name the Celery queue (e.g. `celery`)".into());
    } else if q.chars().any(|c| c.is_whitespace() || c == ',') {
        err(field, format!("{q:?} contains whitespace or ','; Celery's --queues takes plain names"));
    } else if q.len() > 200 {
        err(field, "is longer than 200 bytes".into());
    }
}

/// Durations as Kubernetes users write them: `500ms`, `2s`, `5m`, `1h30m`.
pub fn parse_duration_str(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
        let secs = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(format!("{s:?} has unit {unit:?}; use ms, s, m or h (e.g. `2s`, `5m`)")),
        };
        total += Duration::from_secs_f64(secs);
        rest = tail;
    }
    Ok(total)
}

fn parse_duration(s: &str, field: &str, err: &mut impl FnMut(&str, String)) -> Option<Duration> {
    match parse_duration_str(s) {
        Ok(d) => Some(d),
        Err(e) => {
            err(field, format!("{e}; write a duration such as `2s` or `5m`"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(patch: serde_json::Value) -> TaskQueueSpec {
        let mut base = json!({
            "queue": "celery",
            "extraQueues": ["reports", "notifications"],
            "routes": [{"pattern": "app.worker.tasks.reports.*", "queue": "reports"}],
            "broker": {"urlSecretRef": {"name": "celery-broker", "key": "url"}},
            "worker": {"image": "app:1", "app": "app.worker", "concurrency": 3},
            "scaling": {"minReplicas": 0, "maxReplicas": 5}
        });
        merge(&mut base, patch);
        serde_json::from_value(base).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn errors(patch: serde_json::Value) -> Vec<String> {
        validate(&spec(patch), "general").unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn valid_spec_is_parsed() {
        let v = validate(&spec(json!({})), "general").unwrap();
        assert_eq!(v.queues, ["celery", "reports", "notifications"]);
        assert_eq!(v.node_name, "general");
        assert_eq!(v.tasks_per_replica, 3, "defaults to concurrency");
        assert_eq!(v.poll_interval, Duration::from_secs(2));
        assert_eq!(v.stabilization_window, Duration::from_secs(300));
    }

    #[test]
    fn min_above_max_names_both_fields() {
        let e = errors(json!({"scaling": {"minReplicas": 6, "maxReplicas": 2}}));
        assert_eq!(e, ["spec.scaling.minReplicas: 6 must not exceed spec.scaling.maxReplicas (2); lower minReplicas or raise maxReplicas"]);
    }

    #[test]
    fn route_to_foreign_queue_is_rejected() {
        let e = errors(json!({"routes": [{"pattern": "a.*", "queue": "ai_processing"}]}));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("spec.routes[0].queue: \"ai_processing\" is not consumed by this pool"), "{e:?}");
    }

    #[test]
    fn bad_durations_and_numbers_are_each_reported() {
        let e = errors(json!({
            "worker": {"concurrency": 0},
            "scaling": {"pollInterval": "2 seconds", "scaleDown": {"stabilizationWindow": "5d"}}
        }));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("spec.worker.concurrency: 0 must be at least 1"));
        assert!(e[1].starts_with("spec.scaling.pollInterval:"));
        assert!(e[2].contains("spec.scaling.scaleDown.stabilizationWindow: \"5d\" has unit \"d\""), "{e:?}");
    }

    #[test]
    fn steps_and_fallback_are_checked() {
        let v = validate(
            &spec(json!({"scaling": {"fallbackReplicas": 2, "fallbackAfter": "90s", "scaleUp": {"maxStep": 3}}})),
            "general",
        )
        .unwrap();
        assert_eq!(v.fallback, Some((2, Duration::from_secs(90))));
        assert_eq!((v.scale_up_max_step, v.scale_down_max_step), (Some(3), None));
        assert_eq!(validate(&spec(json!({})), "general").unwrap().fallback, None, "no fallback unless asked");
        let e = errors(json!({"scaling": {"fallbackReplicas": 9, "scaleDown": {"maxStep": 0}}}));
        assert_eq!(
            e,
            [
                "spec.scaling.scaleDown.maxStep: 0 must be at least 1 (or omit it for no limit)",
                "spec.scaling.fallbackReplicas: 9 is outside [minReplicas 0, maxReplicas 5]; pick a count within the bounds"
            ]
        );
    }

    #[test]
    fn queue_names_and_duplicates() {
        let e = errors(json!({"queue": "a b", "extraQueues": ["x", "x", "a b"]}));
        assert!(e.iter().any(|m| m.starts_with("spec.queue: \"a b\" contains whitespace")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.extraQueues[1]: \"x\" is listed twice")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.extraQueues[2]:") && m.contains("repeats spec.queue")), "{e:?}");
    }

    #[test]
    fn broker_url_env_override_is_rejected() {
        let e = errors(json!({"worker": {"env": [{"name": "CELERY_BROKER_URL", "value": "redis://x"}]}}));
        assert!(e[0].starts_with("spec.worker.env[0].name: CELERY_BROKER_URL is set by the operator"), "{e:?}");
    }

    #[test]
    fn pod_template_must_be_a_pod_template() {
        let e = errors(json!({"worker": {"podTemplate": {"spec": {"containers": "nope"}}}}));
        assert!(e[0].starts_with("spec.worker.podTemplate: is not a valid partial PodTemplateSpec"), "{e:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_str("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration_str("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration_str("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration_str("").is_err());
        assert!(parse_duration_str("10").is_err());
        assert!(parse_duration_str("s").is_err());
    }
}
