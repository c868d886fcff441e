//! Operator-side validation of a TaskQueue spec (pure).
//!
//! The CRD schema and CEL rules catch most mistakes at admission time, but clusters older than
//! 1.25 drop CEL rules and objects written before a CRD upgrade skip admission, so every rule is
//! checked here too. The result is either a [`ValidSpec`] with everything parsed, or a list of
//! errors that each name the field and the fix.

use std::fmt;
use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::celery_args;
use crate::crd::{ScaleTargetRef, TaskQueueSpec, WorkerSpec, CONTAINER, MANAGED_LABELS};
use crate::pod_policy::{self, PodPolicy};
use crate::quantity::Quantity;

/// A spec that passed validation, with strings parsed into the types the controller uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub count_in_flight: bool,
    /// ETA/countdown tasks due later than this are scheduled, not demand.
    pub eta_horizon: Duration,
    /// `spec.queue` followed by `spec.extraQueues`, in order.
    pub queues: Vec<String>,
    /// The worker name before `@` in `-n`: from `spec.worker.nodeName` (or the TaskQueue's name);
    /// with `scaleTargetRef`, from the target's command once read (`scale_target::resolve`).
    pub node_name: String,
    /// The worker Deployment's name: the TaskQueue's, or `spec.scaleTargetRef.name`.
    pub deployment: String,
    /// An existing Deployment the operator only scales (`spec.scaleTargetRef`).
    pub scale_target: Option<ScaleTargetRef>,
    pub poll_interval: Duration,
    pub stabilization_window: Duration,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub tasks_per_replica: i64,
    /// With `scaleTargetRef` and no `spec.scaling.tasksPerReplica`, `tasks_per_replica` comes
    /// from the target's `-c` once read (`scale_target::resolve`); 1 until then.
    pub tasks_per_replica_from_target: bool,
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
const MAX_POLL: Duration = Duration::from_secs(3600);
/// Label values (the worker pods carry the TaskQueue's name in `app.kubernetes.io/instance`).
pub const MAX_LABEL_VALUE: usize = 63;

/// Collects the problems of one spec, each naming its field.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }
}

/// [`validate_with`] under the default pod policy (nothing beyond an ordinary pod allowed).
pub fn validate(spec: &TaskQueueSpec, object_name: &str) -> Result<ValidSpec, InvalidSpec> {
    validate_with(spec, object_name, &PodPolicy::default())
}

/// The spec checked, the podTemplate also against the platform's pod policy.
pub fn validate_with(spec: &TaskQueueSpec, object_name: &str, policy: &PodPolicy) -> Result<ValidSpec, InvalidSpec> {
    let mut p = Problems::default();
    if object_name.len() > MAX_LABEL_VALUE {
        p.add(
            "metadata.name",
            format!(
                "is {} characters long; worker pods are labelled with the TaskQueue's name and label values hold at \
                 most {MAX_LABEL_VALUE}: use a name of at most {MAX_LABEL_VALUE} characters",
                object_name.len()
            ),
        );
    }
    let queues = check_queues(spec, &mut p);
    check_routes(spec, &queues, &mut p);
    check_broker(spec, &mut p);
    let (node_name, pod_template) = match (&spec.worker, &spec.scale_target_ref) {
        (Some(w), None) => {
            let node_name = w.node_name.clone().unwrap_or_else(|| object_name.to_string());
            let template = check_worker(w, &node_name, policy, &mut p);
            (node_name, template)
        }
        (None, Some(target)) => {
            check_scale_target(target, &mut p);
            (DEFAULT_NODE_NAME.to_string(), None)
        }
        (Some(_), Some(_)) => {
            p.add(
                "spec.scaleTargetRef",
                "is set together with spec.worker; set spec.worker for a worker Deployment the operator writes, or \
                 spec.scaleTargetRef for an existing Deployment it only scales, not both",
            );
            (String::new(), None)
        }
        (None, None) => {
            p.add(
                "spec.worker",
                "is required: describe the worker (image, app, concurrency), or set spec.scaleTargetRef to scale an \
                 existing Deployment",
            );
            (String::new(), None)
        }
    };
    let s = &spec.scaling;
    let poll_interval = duration(&s.poll_interval, "spec.scaling.pollInterval", MIN_POLL, MAX_POLL, &mut p);
    let window = duration(
        &s.scale_down.stabilization_window,
        "spec.scaling.scaleDown.stabilizationWindow",
        Duration::ZERO,
        MAX_DURATION,
        &mut p,
    );
    let fallback_after =
        duration(&s.fallback_after, "spec.scaling.fallbackAfter", Duration::ZERO, MAX_DURATION, &mut p);
    let eta_horizon = duration(&s.eta_horizon, "spec.scaling.etaHorizon", Duration::ZERO, MAX_DURATION, &mut p);
    check_scaling(spec, &mut p);

    if !p.0.is_empty() {
        return Err(InvalidSpec(p.0));
    }
    Ok(ValidSpec {
        count_in_flight: s.count_in_flight,
        eta_horizon: eta_horizon.unwrap_or_default(),
        queues,
        node_name,
        deployment: spec.scale_target_ref.as_ref().map_or_else(|| object_name.to_string(), |t| t.name.clone()),
        scale_target: spec.scale_target_ref.clone(),
        poll_interval: poll_interval.unwrap_or(MIN_POLL),
        stabilization_window: window.unwrap_or_default(),
        min_replicas: s.min_replicas,
        max_replicas: s.max_replicas,
        tasks_per_replica: i64::from(s.tasks_per_replica.or(spec.worker.as_ref().map(|w| w.concurrency)).unwrap_or(1)),
        tasks_per_replica_from_target: s.tasks_per_replica.is_none() && spec.worker.is_none(),
        activation_threshold: s.activation_threshold,
        scale_up_max_step: s.scale_up.max_step,
        scale_down_max_step: s.scale_down.max_step,
        fallback: s.fallback_replicas.zip(fallback_after),
        pod_template,
    })
}

/// `spec.queue` and `spec.extraQueues`; returns all queues in order.
fn check_queues(spec: &TaskQueueSpec, p: &mut Problems) -> Vec<String> {
    check_queue_name(&spec.queue, "spec.queue", p);
    for (i, q) in spec.extra_queues.iter().enumerate() {
        let field = format!("spec.extraQueues[{i}]");
        check_queue_name(q, &field, p);
        if q == &spec.queue {
            p.add(&field, format!("repeats spec.queue {q:?}; remove it from extraQueues"));
        } else if spec.extra_queues[..i].contains(q) {
            p.add(&field, format!("{q:?} is listed twice; remove the duplicate"));
        }
    }
    std::iter::once(spec.queue.clone()).chain(spec.extra_queues.iter().cloned()).collect()
}

fn check_queue_name(q: &str, field: &str, p: &mut Problems) {
    if q.is_empty() {
        p.add(field, "must not be empty; name the Celery queue (e.g. `celery`)");
    } else if q.chars().any(|c| c.is_whitespace() || c == ',') {
        p.add(field, format!("{q:?} contains whitespace or ','; Celery's --queues takes plain names"));
    } else if q.chars().any(char::is_control) {
        p.add(field, "contains a control character; remove it");
    } else if q.len() > 200 {
        p.add(field, "is longer than 200 bytes");
    }
}

fn check_routes(spec: &TaskQueueSpec, queues: &[String], p: &mut Problems) {
    for (i, route) in spec.routes.iter().enumerate() {
        let field = format!("spec.routes[{i}].pattern");
        if route.pattern.is_empty() {
            p.add(&field, "must not be empty; use a task name or a glob such as `app.tasks.*`");
        } else if route.pattern.chars().count() > 253 {
            p.add(&field, "is longer than 253 characters; shorten the pattern");
        } else if route.pattern.chars().any(char::is_control) {
            p.add(&field, "contains a control character; remove it");
        } else if route.pattern.contains('*') {
            if let Err(e) = crate::routing::Glob::new(&route.pattern) {
                p.add(&field, format!("Celery cannot compile this glob ({e}); fix the [...] class"));
            }
        }
        if let Some(q) = &route.queue {
            if !queues.contains(q) {
                p.add(
                    &format!("spec.routes[{i}].queue"),
                    format!(
                        "{q:?} is not consumed by this pool; use spec.queue or one of spec.extraQueues ({})",
                        queues.join(", ")
                    ),
                );
            }
        }
    }
}

fn check_broker(spec: &TaskQueueSpec, p: &mut Problems) {
    let opts = &spec.broker.transport_options;
    if spec.broker.url_secret_ref.name.is_empty() {
        p.add("spec.broker.urlSecretRef.name", "must name the Secret holding the broker URL");
    }
    if spec.broker.url_secret_ref.key.is_empty() {
        p.add("spec.broker.urlSecretRef.key", "must name the Secret key holding the broker URL (e.g. `url`)");
    }
    if opts.priority_steps.is_empty() {
        p.add(
            "spec.broker.transportOptions.prioritySteps",
            "must list at least one step; kombu's default is [0, 3, 6, 9]",
        );
    }
    for (i, s) in opts.priority_steps.iter().enumerate() {
        let field = format!("spec.broker.transportOptions.prioritySteps[{i}]");
        if *s > 9 {
            p.add(&field, format!("{s} is outside kombu's range 0..9"));
        } else if opts.priority_steps[..i].contains(s) {
            p.add(&field, format!("{s} is listed twice; remove the duplicate"));
        }
    }
    if opts.sep.is_empty() {
        p.add("spec.broker.transportOptions.sep", "must not be empty; kombu's default is \"\\u0006\\u0016\"");
    }
}

/// Celery's worker name before `@` when `-n` is not given (`celery@<hostname>`).
pub const DEFAULT_NODE_NAME: &str = "celery";

/// A Kubernetes object name (RFC 1123 subdomain: Deployments, Leases): lowercase letters,
/// digits, '-' and '.', at most 253, starting and ending alphanumeric.
pub fn dns_subdomain(s: &str) -> bool {
    dns_name(s, true) && s.len() <= 253
}

/// A Kubernetes label-style name (RFC 1123 label: namespaces, containers): lowercase letters,
/// digits and '-', at most 63, starting and ending alphanumeric.
pub fn dns_label(s: &str) -> bool {
    dns_name(s, false) && s.len() <= 63
}

fn dns_name(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `spec.scaleTargetRef`: names the API server would accept.
fn check_scale_target(t: &ScaleTargetRef, p: &mut Problems) {
    if !dns_subdomain(&t.name) {
        p.add(
            "spec.scaleTargetRef.name",
            format!("{:?} is not a Deployment name (lowercase letters, digits, '-' and '.'); name the existing Deployment to scale", t.name),
        );
    }
    if let Some(c) = t.container.as_deref().filter(|c| !dns_label(c)) {
        p.add(
            "spec.scaleTargetRef.container",
            format!("{c:?} is not a container name (lowercase letters, digits and '-', at most 63); name the container that runs `celery worker`, or omit it"),
        );
    }
}

/// `spec.worker`; returns the parsed pod template.
fn check_worker(w: &WorkerSpec, node_name: &str, policy: &PodPolicy, p: &mut Problems) -> Option<PodTemplateSpec> {
    if w.image.trim().is_empty() || w.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        p.add("spec.worker.image", format!("{:?} is not a container image; use e.g. `example/app:1.0`", w.image));
    }
    if w.app.trim().is_empty() || w.app.chars().any(|c| c.is_whitespace() || c.is_control()) {
        p.add("spec.worker.app", format!("{:?} is not a Celery app for `celery -A`; use e.g. `app.worker`", w.app));
    }
    if w.concurrency < 1 {
        p.add("spec.worker.concurrency", format!("{} must be at least 1", w.concurrency));
    }
    if let Some(n) = w.prefetch_multiplier.filter(|n| *n < 1) {
        p.add("spec.worker.prefetchMultiplier", format!("{n} must be at least 1 (or omit it for Celery's default 4)"));
    }
    if node_name.is_empty()
        || node_name.contains(['@', '%'])
        || node_name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        p.add(
            "spec.worker.nodeName",
            format!(
                "{node_name:?} must be non-empty without '@', '%' or spaces; the operator appends `@%h` and finds \
                 each pod's worker by the name `<nodeName>@<pod name>` (Celery would expand a %n or %d)"
            ),
        );
    }
    for (i, message) in celery_args::prefix_problems(&w.command_prefix) {
        p.add(&format!("spec.worker.commandPrefix[{i}]"), message);
    }
    for r in celery_args::refused_options(&w.extra_args) {
        p.add(&format!("spec.worker.extraArgs[{}]", r.index), r.message);
    }
    if let Some(g) = w.termination_grace_period_seconds.filter(|g| *g < 0) {
        p.add("spec.worker.terminationGracePeriodSeconds", format!("{g} must not be negative"));
    }
    check_env(w.env.iter().map(|e| e.name.as_str()), "spec.worker.env", p);
    if let Some(r) = &w.resources {
        check_resources(&r.requests, &r.limits, p);
    }
    let template = w.pod_template.as_ref()?;
    check_pod_template(template, w, p);
    for (field, message) in pod_policy::refused(template, policy) {
        p.add(&field, message);
    }
    match serde_json::from_value::<PodTemplateSpec>(template.clone()) {
        Ok(t) => {
            // Unknown keys would be dropped here without a word: a misspelled field must not
            // silently do nothing.
            let parsed = serde_json::to_value(&t).unwrap_or_default();
            for path in unknown_fields(template, &parsed, "spec.worker.podTemplate".into()) {
                p.add(&path, "is not a field of a pod template; check the spelling (see `kubectl explain pod.spec`)");
            }
            Some(t)
        }
        Err(e) => {
            p.add("spec.worker.podTemplate", format!("is not a valid partial PodTemplateSpec: {e}"));
            None
        }
    }
}

/// Environment variable names as the API server accepts them, each once.
fn check_env<'a>(names: impl Iterator<Item = &'a str>, field: &str, p: &mut Problems) {
    let mut seen = std::collections::HashSet::new();
    for (i, name) in names.enumerate() {
        let field = format!("{field}[{i}].name");
        let valid_start = name.starts_with(|c: char| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_'));
        if name == "CELERY_BROKER_URL" {
            p.add(&field, "CELERY_BROKER_URL is set by the operator from spec.broker.urlSecretRef; remove it");
        } else if !valid_start || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
            p.add(&field, format!("{name:?} is not a valid environment variable name (letters, digits, '_', '-', '.'; not starting with a digit)"));
        } else if !seen.insert(name) {
            p.add(&field, format!("{name:?} is set twice; keep one"));
        }
    }
}

/// Requests and limits: names Kubernetes knows, quantities in its grammar, not negative, and no
/// request above its limit (all of which the API server would refuse).
fn check_resources(requests: &BTreeMap<String, IntOrString>, limits: &BTreeMap<String, IntOrString>, p: &mut Problems) {
    let mut parsed = |kind: &str, m: &BTreeMap<String, IntOrString>| {
        let mut out = BTreeMap::new();
        for (name, v) in m {
            let field = format!("spec.worker.resources.{kind}[{name:?}]");
            if !resource_name_ok(name) {
                p.add(&field, "is not a resource Kubernetes knows; use cpu, memory, ephemeral-storage, hugepages-<size> or a fully qualified extended resource such as nvidia.com/gpu");
                continue;
            }
            let text = match v {
                IntOrString::Int(i) => i.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            match Quantity::parse(&text) {
                Ok(q) if q.is_negative() => p.add(&field, format!("{text:?} must not be negative")),
                Ok(q) => {
                    out.insert(name.clone(), q);
                }
                Err(e) => p.add(&field, e),
            }
        }
        out
    };
    let requests = parsed("requests", requests);
    let limits = parsed("limits", limits);
    for (name, request) in &requests {
        if limits.get(name).is_some_and(|limit| request > limit) {
            p.add(
                &format!("spec.worker.resources.requests[{name:?}]"),
                format!("is above its limit; raise spec.worker.resources.limits[{name:?}] or lower the request"),
            );
        }
    }
}

fn resource_name_ok(name: &str) -> bool {
    let chars_ok =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    match name.split_once('/') {
        Some((domain, n)) => chars_ok(domain) && chars_ok(n) && !n.contains('/') && name.len() <= 253,
        None => {
            matches!(name, "cpu" | "memory" | "ephemeral-storage")
                || name.strip_prefix("hugepages-").is_some_and(|s| Quantity::parse(s).is_ok())
        }
    }
}

/// The pod template may add to the pod, not replace what the operator manages: it would be
/// silently overwritten, and the user would never learn why their value does not apply.
fn check_pod_template(template: &serde_json::Value, w: &crate::crd::WorkerSpec, p: &mut Problems) {
    const F: &str = "spec.worker.podTemplate";
    if !template.is_object() {
        p.add(F, "must be an object (a partial PodTemplateSpec with metadata and spec)");
        return;
    }
    if let Some(labels) = template.pointer("/metadata/labels").and_then(|l| l.as_object()) {
        for key in MANAGED_LABELS.iter().filter(|k| labels.contains_key(**k)) {
            p.add(
                &format!("{F}.metadata.labels[{key:?}]"),
                "is set by the operator (it selects the worker pods); remove it",
            );
        }
    }
    if template.pointer("/spec/terminationGracePeriodSeconds").is_some() {
        p.add(
            &format!("{F}.spec.terminationGracePeriodSeconds"),
            "is set by the operator; use spec.worker.terminationGracePeriodSeconds",
        );
    }
    // The operator finds each pod's worker by the name `<nodeName>@<pod name>`; with another
    // hostname every pod would look idle on a scale-in, and busy ones would go first.
    for (key, how) in [
        ("hostname", "sets another hostname"),
        ("setHostnameAsFQDN", "makes the hostname the pod's FQDN"),
        ("hostNetwork", "gives the worker the node's hostname"),
    ] {
        match template.pointer(&format!("/spec/{key}")) {
            None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => {}
            Some(_) => p.add(
                &format!("{F}.spec.{key}"),
                format!(
                    "{how}, so the worker's name would not be `<nodeName>@<pod name>` and the operator could not tell \
                     busy pods from idle ones on a scale-in; remove it"
                ),
            ),
        }
    }
    let containers = template.pointer("/spec/containers").and_then(|c| c.as_array()).map_or(&[][..], Vec::as_slice);
    for (i, c) in
        containers.iter().enumerate().filter(|(_, c)| c.get("name").and_then(|n| n.as_str()) == Some(CONTAINER))
    {
        let field = format!("{F}.spec.containers[{i}]");
        for (key, instead) in [
            ("image", "spec.worker.image"),
            ("command", "spec.worker.commandPrefix for a wrapper, spec.worker.app, queue and concurrency"),
            ("args", "spec.worker.extraArgs"),
            ("resources", "spec.worker.resources"),
        ] {
            if c.get(key).is_some() {
                p.add(
                    &format!("{field}.{key}"),
                    format!("is set by the operator for the worker container; use {instead}"),
                );
            }
        }
        let env = c.get("env").and_then(|e| e.as_array()).map_or(&[][..], Vec::as_slice);
        let names = env.iter().map(|e| e.get("name").and_then(|n| n.as_str()).unwrap_or_default());
        check_env(
            names.chain(w.env.iter().map(|e| e.name.as_str())),
            &format!("{field}.env (with spec.worker.env)"),
            p,
        );
    }
}

/// Keys of `input` that parsing into the typed object dropped (null values aside: those mean
/// "not set" and are dropped on purpose).
fn unknown_fields(input: &serde_json::Value, parsed: &serde_json::Value, path: String) -> Vec<String> {
    use serde_json::Value;
    match (input, parsed) {
        (Value::Object(i), Value::Object(o)) => i
            .iter()
            .filter(|(_, v)| !v.is_null())
            .flat_map(|(k, v)| match o.get(k) {
                None => vec![format!("{path}.{k}")],
                Some(pv) => unknown_fields(v, pv, format!("{path}.{k}")),
            })
            .collect(),
        (Value::Array(i), Value::Array(o)) => {
            i.iter().zip(o).enumerate().flat_map(|(n, (v, pv))| unknown_fields(v, pv, format!("{path}[{n}]"))).collect()
        }
        _ => Vec::new(),
    }
}

fn check_scaling(spec: &TaskQueueSpec, p: &mut Problems) {
    let s = &spec.scaling;
    if s.min_replicas < 0 {
        p.add("spec.scaling.minReplicas", format!("{} must not be negative", s.min_replicas));
    }
    if s.max_replicas < 0 {
        p.add("spec.scaling.maxReplicas", format!("{} must not be negative", s.max_replicas));
    }
    if s.min_replicas > s.max_replicas {
        p.add(
            "spec.scaling.minReplicas",
            format!(
                "{} must not exceed spec.scaling.maxReplicas ({}); lower minReplicas or raise maxReplicas",
                s.min_replicas, s.max_replicas
            ),
        );
    }
    if let Some(t) = s.tasks_per_replica.filter(|t| *t < 1) {
        p.add("spec.scaling.tasksPerReplica", format!("{t} must be at least 1 (or omit it to use worker.concurrency)"));
    }
    if s.activation_threshold < 0 {
        p.add("spec.scaling.activationThreshold", format!("{} must not be negative", s.activation_threshold));
    }
    for (field, step) in [
        ("spec.scaling.scaleUp.maxStep", s.scale_up.max_step),
        ("spec.scaling.scaleDown.maxStep", s.scale_down.max_step),
    ] {
        if let Some(n) = step.filter(|n| *n < 1) {
            p.add(field, format!("{n} must be at least 1 (or omit it for no limit)"));
        }
    }
    if let Some(f) = s.fallback_replicas {
        if f < s.min_replicas || f > s.max_replicas {
            p.add(
                "spec.scaling.fallbackReplicas",
                format!(
                    "{f} is outside [minReplicas {}, maxReplicas {}]; pick a count within the bounds",
                    s.min_replicas, s.max_replicas
                ),
            );
        }
    }
}

/// The longest duration any field accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Durations as Kubernetes users write them: `500ms`, `2s`, `5m`, `1h30m`, `1.5h` (the CRD's
/// pattern). Total: any input gives a value or an error, never a panic; more than
/// [`MAX_DURATION`] is an error.
pub fn parse_duration_str(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    let not_a_duration = || format!("{s:?} is not a duration");
    let mut total_ns: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int, tail) = rest.split_at(int_len);
        let (frac, tail) = match tail.strip_prefix('.') {
            // `1.5h`; a dot needs digits on both sides.
            Some(t) => t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len())),
            None => ("", tail),
        };
        let dot_without_digits = frac.is_empty() && tail.len() < rest.len() - int_len;
        if int.is_empty() || dot_without_digits {
            return Err(not_a_duration());
        }
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("{s:?} has a number without a unit; use ms, s, m or h (e.g. `2s`, `5m`)")),
            _ => return Err(format!("{s:?} has unit {unit:?}; use ms, s, m or h (e.g. `2s`, `5m`)")),
        };
        // Saturating: anything this large is over the maximum anyway.
        let whole = int.bytes().fold(0u128, |v, d| v.saturating_mul(10).saturating_add(u128::from(d - b'0')));
        let mut part = whole.saturating_mul(unit_ns);
        let mut scale = unit_ns;
        for d in frac.bytes().take(12) {
            scale /= 10;
            part = part.saturating_add(u128::from(d - b'0') * scale);
        }
        total_ns = total_ns.saturating_add(part);
        rest = tail;
    }
    if total_ns > MAX_DURATION.as_nanos() {
        return Err(format!("{s:?} is longer than the maximum 24h"));
    }
    Ok(Duration::from_nanos(u64::try_from(total_ns).map_err(|_| not_a_duration())?))
}

/// A duration field within `[min, max]`.
fn duration(s: &str, field: &str, min: Duration, max: Duration, p: &mut Problems) -> Option<Duration> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    match parse_duration_str(s) {
        Ok(d) if d < min => p.add(field, format!("{s:?} is below the minimum {}", show(min))),
        Ok(d) if d > max => p.add(field, format!("{s:?} is above the maximum {}", show(max))),
        Ok(d) => return Some(d),
        Err(e) => p.add(field, format!("{e}; write a duration such as `2s` or `5m`")),
    }
    None
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
        assert_eq!(v.eta_horizon, Duration::from_secs(30), "etaHorizon defaults to 30s");
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
    fn resources_are_checked_like_the_api_server_would() {
        let e = errors(json!({"worker": {"resources": {
            "requests": {"cpu": "2", "memory": "lots", "gpu": 1, "nvidia.com/gpu": -1},
            "limits": {"cpu": "500m"}
        }}}));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.worker.resources.requests[\"gpu\"]: is not a resource")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.worker.resources.requests[\"memory\"]: \"lots\"")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("[\"nvidia.com/gpu\"]: \"-1\" must not be negative")), "{e:?}");
        assert!(
            e.iter().any(|m| m.starts_with("spec.worker.resources.requests[\"cpu\"]: is above its limit")),
            "{e:?}"
        );
        let ok = json!({"worker": {"resources": {"requests": {"cpu": "0.5", "memory": "1Gi", "hugepages-2Mi": "0"}, "limits": {"cpu": "500m"}}}});
        assert!(validate(&spec(ok), "general").is_ok());
    }

    #[test]
    fn a_worker_name_that_cannot_match_its_pod_is_refused() {
        let e = errors(json!({"worker": {"nodeName": "w%n", "podTemplate": {"spec": {
            "hostname": "fixed", "setHostnameAsFQDN": true, "hostNetwork": true, "subdomain": "ok"}}}}));
        for want in [
            "spec.worker.nodeName: \"w%n\" must be non-empty without '@', '%' or spaces",
            "spec.worker.podTemplate.spec.hostname: sets another hostname",
            "spec.worker.podTemplate.spec.setHostnameAsFQDN: makes the hostname the pod's FQDN",
            "spec.worker.podTemplate.spec.hostNetwork: gives the worker the node's hostname",
        ] {
            assert!(e.iter().any(|m| m.starts_with(want)), "missing {want:?} in {e:#?}");
        }
        assert_eq!(e.len(), 4, "{e:#?}");
        let ok = json!({"worker": {"podTemplate": {"spec": {"hostNetwork": false, "setHostnameAsFQDN": false}}}});
        assert!(validate(&spec(ok), "general").is_ok());
    }

    #[test]
    fn owned_worker_options_and_bad_prefixes_name_the_field_to_use() {
        let e = errors(json!({"worker": {"commandPrefix": ["uv", "run", "celery"],
                                         "extraArgs": ["-l", "info", "-Q", "other", "--autoscale=8,2"]}}));
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].starts_with("spec.worker.commandPrefix[2]: \"celery\" is added by the operator"), "{e:#?}");
        assert!(
            e[1].starts_with("spec.worker.extraArgs[2]: \"-Q\" sets the queues") && e[1].contains("spec.extraQueues")
        );
        assert!(e[2].starts_with("spec.worker.extraArgs[4]: \"--autoscale=8,2\" sets Celery's own autoscaler"));
        let ok = json!({"worker": {"commandPrefix": ["ddtrace-run"], "extraArgs": ["-l", "info", "-O", "fair"]}});
        assert!(validate(&spec(ok), "general").is_ok());
    }

    #[test]
    fn names_that_cannot_become_labels_are_rejected_with_the_limit() {
        let long = "a".repeat(64);
        let e = validate(&spec(json!({})), &long).unwrap_err().to_string();
        assert!(e.starts_with("metadata.name: is 64 characters long") && e.contains("at most 63"), "{e}");
        assert!(validate(&spec(json!({})), &"a".repeat(63)).is_ok());
    }

    #[test]
    fn a_pod_template_cannot_replace_what_the_operator_manages() {
        let e = errors(json!({"worker": {
            "env": [{"name": "APP_ENV", "value": "1"}, {"name": "APP_ENV", "value": "2"}, {"name": "1BAD", "value": "x"}],
            "podTemplate": {
                "metadata": {"labels": {"app.kubernetes.io/instance": "spoofed", "team": "ok"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "worker", "image": "evil:1", "command": ["sh"], "args": ["-c"], "env": [{"name": "CELERY_BROKER_URL", "value": "redis://evil"}]}]
                }
            }
        }}));
        for want in [
            "spec.worker.env[1].name: \"APP_ENV\" is set twice",
            "spec.worker.env[2].name: \"1BAD\" is not a valid environment variable name",
            "spec.worker.podTemplate.metadata.labels[\"app.kubernetes.io/instance\"]: is set by the operator",
            "spec.worker.podTemplate.spec.terminationGracePeriodSeconds: is set by the operator",
            "spec.worker.podTemplate.spec.containers[0].image: is set by the operator for the worker container; use spec.worker.image",
            "spec.worker.podTemplate.spec.containers[0].command: is set by the operator",
            "spec.worker.podTemplate.spec.containers[0].args: is set by the operator",
            "spec.worker.podTemplate.spec.containers[0].env (with spec.worker.env)[0].name: CELERY_BROKER_URL is set by the operator",
        ] {
            assert!(e.iter().any(|m| m.starts_with(want)), "missing {want:?} in {e:#?}");
        }
        let e = errors(
            json!({"worker": {"podTemplate": {"spec": {"nodeSelecter": {"a": "b"}, "containers": [{"name": "side", "imagePullPolicee": "x"}]}}}}),
        );
        assert_eq!(
            e,
            [
                "spec.worker.podTemplate.spec.containers[0].imagePullPolicee: is not a field of a pod template; check the spelling (see `kubectl explain pod.spec`)",
                "spec.worker.podTemplate.spec.nodeSelecter: is not a field of a pod template; check the spelling (see `kubectl explain pod.spec`)"
            ]
        );
        let fine = json!({"worker": {"podTemplate": {"metadata": {"labels": {"any-key": "v"}}, "spec": {"nodeSelector": {"x/y": "z"}, "tolerations": [{"key": "k", "operator": "Exists"}], "affinity": null}}}});
        assert!(validate(&spec(fine), "general").is_ok(), "map keys and nulls are not unknown fields");
        let e = errors(json!({"worker": {"podTemplate": "not an object"}}));
        assert!(e[0].starts_with("spec.worker.podTemplate: must be an object"), "{e:?}");
    }

    #[test]
    fn duration_bounds_name_the_limit() {
        let e = errors(
            json!({"scaling": {"pollInterval": "2h", "fallbackAfter": "25h", "etaHorizon": "1d", "scaleDown": {"stabilizationWindow": "99999999999999999999999h"}}}),
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("spec.scaling.pollInterval: \"2h\" is above the maximum 1h"), "{e:?}");
        assert!(e[1].contains("is longer than the maximum 24h"), "{e:?}");
        assert!(e[2].starts_with("spec.scaling.fallbackAfter: \"25h\" is longer than the maximum 24h"), "{e:?}");
        assert!(e[3].starts_with("spec.scaling.etaHorizon: \"1d\""), "{e:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_str("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration_str("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration_str("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration_str("").is_err());
        assert!(parse_duration_str("10").is_err());
        assert!(parse_duration_str("s").is_err());
        assert!(parse_duration_str("5.s").is_err());
        assert!(parse_duration_str(".5s").is_err());
        assert_eq!(parse_duration_str("0.0000000001s").unwrap(), Duration::ZERO, "below a nanosecond");
        assert_eq!(parse_duration_str("24h").unwrap(), MAX_DURATION);
        assert!(parse_duration_str("24h1ms").is_err());
        // Twenty-odd digits used to panic in Duration::from_secs_f64 and +=.
        for huge in ["99999999999999999999999h", "18446744073709551616s", "1e400s", "9".repeat(5000).as_str()] {
            assert!(parse_duration_str(huge).is_err(), "{huge}");
        }
    }
}
