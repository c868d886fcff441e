//! The `TaskQueue` API (group `taskqueue.dev`, version `v1alpha1`).
//!
//! Field types are deliberately lenient where users type free text (durations are strings,
//! quantities are int-or-string): a value the operator cannot use must still deserialize, so
//! that it becomes a `SpecValid=False` condition on that one object instead of a watch error
//! that would stall every TaskQueue. `validate.rs` does the strict checking.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Kombu's default separator between a queue name and its priority step (bytes 0x06 0x16).
pub const DEFAULT_SEP: &str = "\u{6}\u{16}";
/// The annotation that freezes a pool's replica count (`"true"`).
pub const PAUSED_ANNOTATION: &str = "taskqueue.dev/paused";

/// Kombu's default priority steps.
pub const DEFAULT_PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The field manager of everything the operator writes, and its `managed-by` label value.
pub const MANAGER: &str = "taskqueue-operator";
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=taskqueue-operator";
/// The name of the Celery container in the worker pods the operator writes.
pub const CONTAINER: &str = "worker";

/// The labels the operator sets on the Deployment and its pods (name, instance, managed-by,
/// component); the first two form the (immutable) selector.
pub const MANAGED_LABELS: [&str; 4] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
];

/// Desired state of a Celery worker pool consuming one queue (plus optional extra queues).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "taskqueue.dev",
    version = "v1alpha1",
    kind = "TaskQueue",
    plural = "taskqueues",
    shortname = "tq",
    category = "celery",
    namespaced,
    status = "TaskQueueStatus",
    doc = "A Celery queue, the task routes sent to it and the worker pool that consumes it, scaled from the Redis broker.",
    printcolumn = r#"{"name":"Queue","type":"string","jsonPath":".spec.queue","description":"Celery queue consumed by the workers"}"#,
    printcolumn = r#"{"name":"Pending","type":"integer","jsonPath":".status.pending","description":"Messages waiting in Redis that this pool counts (all priorities, all its queues)"}"#,
    printcolumn = r#"{"name":"In-Flight","type":"integer","priority":1,"jsonPath":".status.inFlight","description":"Unacked messages this pool counts (prefetched, acks_late running, ETA within etaHorizon)"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas","description":"Replicas the operator asks for"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas","description":"Ready worker pods"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","priority":1,"jsonPath":".spec.scaling.maxReplicas","description":"spec.scaling.maxReplicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Last-Scale","type":"string","priority":1,"jsonPath":".status.lastScaleReason","description":"Why the operator last changed the replica count"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TaskQueueSpec {
    /// Celery queue the workers consume (`celery worker --queues=<queue>`). Also the base name of
    /// the Redis lists kombu pushes to. Must match the queue name the Celery app routes to.
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\s,\x00-\x1F\x7F]+$"))]
    pub queue: String,

    /// Further queues the same workers consume, e.g. `[reports, notifications]` for a general
    /// pool on `celery`. Their pending messages count towards this pool's demand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 200), regex(pattern = r"^[^\s,\x00-\x1F\x7F]+$")))]
    pub extra_queues: Vec<String>,

    /// Ordered Celery task routes served by this pool. Order matters (first match wins), which is
    /// why this is a list and not a map. Stored and validated now; published as the Celery
    /// routing table by the routing feature.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub routes: Vec<Route>,

    /// Where the Redis broker is and how kombu lays out its keys.
    pub broker: BrokerSpec,

    /// The Celery worker container, for a worker Deployment the operator writes and owns.
    /// Exactly one of `worker` and `scaleTargetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerSpec>,

    /// An existing Deployment in this namespace (e.g. from the app's own chart) that the
    /// operator only scales: it sets `spec.replicas` and the pods' deletion costs, never the
    /// template. Its worker command is read and mismatches are reported in `WorkerMatches`.
    /// Exactly one of `worker` and `scaleTargetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_target_ref: Option<ScaleTargetRef>,

    /// Replica bounds and how demand turns into replicas.
    #[serde(default)]
    pub scaling: ScalingSpec,
}

/// One `task_routes` entry.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Task name or glob, with Celery semantics: a glob only if it contains `*`
    /// (e.g. `app.worker.tasks.ai_tasks.*`); otherwise an exact task name.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[^\x00-\x1F\x7F]+$"))]
    pub pattern: String,
    /// Queue the matching tasks are sent to. Defaults to `spec.queue`; must be `spec.queue` or
    /// one of `spec.extraQueues`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub queue: Option<String>,
}

/// The Redis broker the Celery app uses.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Secret in this namespace holding the Celery broker URL (`redis://[user:pass@]host:port/db`
    /// or `rediss://...`). The workers get the same value as `CELERY_BROKER_URL`.
    pub url_secret_ref: SecretKeyRef,
    /// Must equal the app's `broker_transport_options`, or the operator counts the wrong keys.
    #[serde(default)]
    pub transport_options: TransportOptions,
    /// Secret in this namespace holding the PEM CA bundle that signed the broker's certificate
    /// (`rediss://` only). Without it the Mozilla root store built into the operator is used
    /// (public CAs; not the OS trust store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

/// A key of a Secret holding a PEM CA bundle.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct CaSecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// A key of a Secret in the TaskQueue's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "url".into()
}

/// The subset of kombu's Redis `broker_transport_options` that decides key names.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransportOptions {
    /// kombu `global_keyprefix`: prepended verbatim (no separator added) to every key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 200))]
    pub global_keyprefix: String,
    /// kombu `priority_steps`: one Redis list per step. Default `[0, 3, 6, 9]`.
    #[serde(default = "default_priority_steps")]
    #[schemars(length(min = 1, max = 10), inner(range(min = 0, max = 9)))]
    pub priority_steps: Vec<u8>,
    /// kombu `sep`: between the queue name and the priority step. Default is the two bytes
    /// 0x06 0x16 (`"\u0006\u0016"`).
    #[serde(default = "default_sep")]
    #[schemars(length(min = 1, max = 16))]
    pub sep: String,
    /// kombu `master_name`: the Sentinel master to use. Required with `sentinel://` broker URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub master_name: Option<String>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            global_keyprefix: String::new(),
            priority_steps: default_priority_steps(),
            sep: default_sep(),
            master_name: None,
        }
    }
}

fn default_priority_steps() -> Vec<u8> {
    DEFAULT_PRIORITY_STEPS.to_vec()
}

fn default_sep() -> String {
    DEFAULT_SEP.into()
}

/// An existing Deployment to scale (KEDA's `scaleTargetRef`, Deployments only).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// Name of the Deployment, in the TaskQueue's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The container that runs `celery worker`. Default: the one whose command or args do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,
}

/// The worker container: `[commandPrefix...] celery -A <app> worker --queues=... --concurrency=<n>
/// -n <nodeName>@%h [extraArgs...]`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Container image with the Celery app and the `celery` executable.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// Celery app for `celery -A` (e.g. `app.worker`).
    #[schemars(length(min = 1, max = 253))]
    pub app: String,
    /// Words run before `celery`, for an app started through a wrapper: `[ddtrace-run]`,
    /// `[opentelemetry-instrument]`, `[newrelic-admin, run-program]`, `[python, -m]`, `[uv, run]`
    /// or an entrypoint script. The command stays in exec form, so the wrapper is the container's
    /// first process: it must exec `celery` (all of the above do; a script ends with
    /// `exec "$@"`), or SIGTERM never reaches Celery and a scale-in kills running tasks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 1024)))]
    pub command_prefix: Vec<String>,
    /// Worker processes per pod (`--concurrency`).
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: i32,
    /// `--prefetch-multiplier`; omitted means Celery's default (4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub prefetch_multiplier: Option<i32>,
    /// Node name for `-n <nodeName>@%h`. Defaults to the TaskQueue's name. No `%`: the operator
    /// finds each pod's worker by the name `<nodeName>@<pod name>` in its heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\s@%]+$"))]
    pub node_name: Option<String>,
    /// Extra arguments appended to the worker command line (`-l info`, `-O fair`,
    /// `--max-tasks-per-child=100`, ...). Options the operator sets or relies on are refused,
    /// naming the field to use instead: `-A`, `-b`, `-Q`, `-X`, `-c`, `--autoscale`, `-n`,
    /// `--prefetch-multiplier`, `--without-heartbeat`, `-D`, `-B`, `--purge`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub extra_args: Vec<String>,
    /// Extra environment variables for the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Compute resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// Seconds a pod gets after SIGTERM (Celery warm shutdown) before SIGKILL. It must cover the
    /// longest task, or scale-down kills running work. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
    /// Partial pod template merged into the generated one (labels, annotations, nodeSelector,
    /// tolerations, affinity, volumes, serviceAccountName, a container named `worker` for
    /// volumeMounts, ...). The operator owns the worker container's image, command, args,
    /// resources and CELERY_BROKER_URL, the pod's terminationGracePeriodSeconds and the
    /// app.kubernetes.io labels: a template that sets them is rejected, naming the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub pod_template: Option<serde_json::Value>,
}

fn default_concurrency() -> i32 {
    1
}

/// Requests and limits, e.g. `{cpu: 500m, memory: 1Gi}`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WorkerResources {
    /// Minimum resources the scheduler reserves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, IntOrString>,
    /// Maximum resources the container may use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, IntOrString>,
}

/// How pending work becomes replicas.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Fewest replicas. 0 allows scale-to-zero when the queues are empty.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_replicas: i32,
    /// Pending messages one replica is expected to handle. Defaults to `worker.concurrency`
    /// (with `scaleTargetRef`: the `-c`/`--concurrency` of the target's worker command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub tasks_per_replica: Option<i32>,
    /// Pending messages needed before scaling up from zero replicas.
    #[serde(default = "default_activation_threshold")]
    #[schemars(range(min = 0, max = 1000000))]
    pub activation_threshold: i64,
    /// How often the broker is read, as a duration (`2s`, `500ms`, `1m`): 100ms to 1h.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub poll_interval: String,
    /// Count in-flight messages (fetched by workers, not yet acknowledged: prefetched,
    /// `acks_late` running, ETA/countdown due within `etaHorizon`) as demand next to pending
    /// ones. Either way the pool never goes to zero while such messages exist.
    #[serde(default = "default_true")]
    pub count_in_flight: bool,
    /// A task a worker holds for its ETA/countdown is demand only once it is due within this
    /// (`30s`: about the time a new worker pod needs to start); until then it is `scheduled` and
    /// adds no replicas (it still keeps one worker). At most 24h.
    #[serde(default = "default_eta_horizon")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub eta_horizon: String,
    /// Replicas to run once the broker has been unreadable for `fallbackAfter`. Unset: replicas
    /// stay frozen for the whole outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub fallback_replicas: Option<i32>,
    /// How long the broker must be unreadable before `fallbackReplicas` applies (`5m`); at most
    /// 24h.
    #[serde(default = "default_fallback_after")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub fallback_after: String,
    /// Scale-up behaviour.
    #[serde(default)]
    pub scale_up: ScaleUpSpec,
    /// Scale-down behaviour.
    #[serde(default)]
    pub scale_down: ScaleDownSpec,
}

fn default_fallback_after() -> String {
    "5m".into()
}

fn default_eta_horizon() -> String {
    "30s".into()
}

/// Scale-up behaviour.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUpSpec {
    /// Most replicas added in one step. Unset: straight to the recommendation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_step: Option<i32>,
}

fn default_true() -> bool {
    true
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: default_max_replicas(),
            tasks_per_replica: None,
            activation_threshold: default_activation_threshold(),
            poll_interval: default_poll_interval(),
            count_in_flight: true,
            eta_horizon: default_eta_horizon(),
            fallback_replicas: None,
            fallback_after: default_fallback_after(),
            scale_up: ScaleUpSpec::default(),
            scale_down: ScaleDownSpec::default(),
        }
    }
}

fn default_max_replicas() -> i32 {
    10
}
fn default_activation_threshold() -> i64 {
    1
}
fn default_poll_interval() -> String {
    "2s".into()
}

/// Scale-down behaviour.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownSpec {
    /// Scale down only to the highest replica count recommended within this window (`5m`),
    /// so a short lull does not stop workers that are needed again a moment later. At most 24h.
    #[serde(default = "default_stabilization_window")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub stabilization_window: String,
    /// Most replicas removed in one step (one step per poll). Unset: straight to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_step: Option<i32>,
}

impl Default for ScaleDownSpec {
    fn default() -> Self {
        Self { stabilization_window: default_stabilization_window(), max_step: None }
    }
}

fn default_stabilization_window() -> String {
    "300s".into()
}

/// Observed state, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskQueueStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Messages waiting in Redis that this pool counts, summed over its queues and their
    /// priority lists (of a queue shared with other TaskQueues, this pool's part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,
    /// Messages fetched by workers but not acknowledged (kombu's `unacked` hash) that this
    /// pool counts: prefetched, `acks_late` running, and ETA/countdown tasks due within
    /// `etaHorizon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// Unacknowledged ETA/countdown tasks due later than `etaHorizon`: held by a worker, not
    /// demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<i64>,
    /// Unacknowledged messages that no live worker can be holding: delivered before every live
    /// worker of the pools consuming their queue started (their worker died: SIGKILL, OOM, a
    /// lost node). Not demand; kombu restores them after the transport's `visibility_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphaned: Option<i64>,
    /// Pending messages per queue (whole queues, shared or not).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending_by_queue: BTreeMap<String, i64>,
    /// Replicas the operator last asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Replicas of the worker Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Ready replicas of the worker Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// When the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// Label selector of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `SpecValid`, `BrokerReachable`, `DeploymentOwned`, `RoutesAccepted`,
    /// `ScalingLimited` (the replica count is held by a bound, the window or unacked work).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Partial pod template merged into the generated one (labels, annotations, nodeSelector, tolerations, affinity, volumes, serviceAccountName, a container named `worker` for volumeMounts, ...). The operator owns the worker container's image, command, args, resources and CELERY_BROKER_URL, the pod's terminationGracePeriodSeconds and the app.kubernetes.io labels: a template that sets them is rejected, naming the field.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// CEL rules, added to the generated schema here so each sits next to the path it checks.
/// Clusters without CEL (< 1.25) drop them; `validate.rs` enforces the same rules.
const CEL_RULES: &[(&str, &str, &str)] = &[
    (
        "",
        "size(self.metadata.name) <= 63",
        "metadata.name must be at most 63 characters: worker pods carry it as a label value",
    ),
    (
        "/properties/spec/properties/scaling/properties/pollInterval",
        "duration(self) >= duration('100ms') && duration(self) <= duration('1h')",
        "spec.scaling.pollInterval must lie within [100ms, 1h]",
    ),
    (
        "/properties/spec/properties/scaling/properties/etaHorizon",
        "duration(self) <= duration('24h')",
        "spec.scaling.etaHorizon must be at most 24h",
    ),
    (
        "/properties/spec/properties/scaling/properties/fallbackAfter",
        "duration(self) <= duration('24h')",
        "spec.scaling.fallbackAfter must be at most 24h",
    ),
    (
        "/properties/spec/properties/scaling/properties/scaleDown/properties/stabilizationWindow",
        "duration(self) <= duration('24h')",
        "spec.scaling.scaleDown.stabilizationWindow must be at most 24h",
    ),
    (
        "/properties/spec",
        "has(self.worker) != has(self.scaleTargetRef)",
        "exactly one of spec.worker (a worker Deployment the operator writes) and spec.scaleTargetRef (an existing Deployment it only scales) must be set",
    ),
    (
        "/properties/spec",
        "self.scaling.minReplicas <= self.scaling.maxReplicas",
        "spec.scaling.minReplicas must not exceed spec.scaling.maxReplicas",
    ),
    (
        "/properties/spec/properties/scaling",
        "!has(self.fallbackReplicas) || (self.fallbackReplicas >= self.minReplicas && self.fallbackReplicas <= self.maxReplicas)",
        "spec.scaling.fallbackReplicas must lie within [minReplicas, maxReplicas]",
    ),
    (
        "/properties/spec",
        "!has(self.routes) || self.routes.all(r, !has(r.queue) || r.queue == self.queue || (has(self.extraQueues) && r.queue in self.extraQueues))",
        "spec.routes[].queue must be spec.queue or one of spec.extraQueues",
    ),
    (
        "/properties/spec",
        "!has(self.extraQueues) || !(self.queue in self.extraQueues)",
        "spec.extraQueues must not repeat spec.queue",
    ),
    (
        "/properties/spec/properties/extraQueues",
        "self.all(q, self.exists_one(x, x == q))",
        "spec.extraQueues must not contain duplicates",
    ),
    (
        "/properties/spec/properties/broker/properties/transportOptions/properties/prioritySteps",
        "self.all(i, self.exists_one(x, x == i))",
        "spec.broker.transportOptions.prioritySteps must not contain duplicates",
    ),
];

/// The CRD as installed: derived schema plus CEL rules and the conditions list-map markers.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut value = serde_json::to_value(TaskQueue::crd()).expect("CRD serializes");
    let schema = &mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for (path, rule, message) in CEL_RULES {
        let node = schema.pointer_mut(path).expect("CEL rule path exists in schema");
        let rules = node
            .as_object_mut()
            .expect("schema node is an object")
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]));
        rules.as_array_mut().expect("validations is a list").push(json!({"rule": rule, "message": message}));
    }
    // metav1.Condition lists are maps keyed by `type`, so SSA merges conditions by type.
    let conditions =
        schema.pointer_mut("/properties/status/properties/conditions").expect("status.conditions in schema");
    conditions["x-kubernetes-list-type"] = json!("map");
    conditions["x-kubernetes-list-map-keys"] = json!(["type"]);
    clean_schema(schema);
    serde_json::from_value(value).expect("patched CRD deserializes")
}

/// Schema details some API servers choke on. Versions up to at least 1.20 read a `default: ""` as
/// null and reject the CRD ("must be of type string"); an empty string is serde's default anyway,
/// so those defaults are left out. Unknown `format`s only draw warnings, but noisy ones.
fn clean_schema(node: &mut serde_json::Value) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    // schemars writes `format: uint8` for u8; Kubernetes warns about formats it does not know.
    if obj.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("uint")) {
        obj.remove("format");
    }
    match obj.get_mut("default") {
        Some(serde_json::Value::String(s)) if s.is_empty() => {
            obj.remove("default");
        }
        Some(serde_json::Value::Object(d)) => d.retain(|_, v| v.as_str() != Some("")),
        _ => {}
    }
    for child in obj.values_mut() {
        match child {
            serde_json::Value::Object(_) => clean_schema(child),
            serde_json::Value::Array(items) => items.iter_mut().for_each(clean_schema),
            _ => {}
        }
    }
}

/// `taskqueue-operator crd` output and the content of `crds/taskqueue.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("CRD serializes to YAML");
    format!("# Generated by `taskqueue-operator crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_generated() {
        let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/taskqueue.yaml"))
            .expect("crds/taskqueue.yaml exists");
        assert!(committed == crd_yaml(), "crds/taskqueue.yaml is stale: run `cargo run -- crd > crds/taskqueue.yaml`");
    }

    #[test]
    fn chart_crd_matches_generated() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/taskqueue-operator/crds/taskqueue.yaml");
        if let Ok(chart) = std::fs::read_to_string(path) {
            assert!(chart == crd_yaml(), "{path} is stale: copy crds/taskqueue.yaml");
        }
    }

    #[test]
    fn every_schema_property_has_a_description() {
        let value = serde_json::to_value(crd()).unwrap();
        let schema = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut missing = Vec::new();
        walk(schema, "spec", &mut missing);
        assert!(missing.is_empty(), "fields without description: {missing:?}");

        fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
            if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
                for (name, child) in props {
                    let child_path = format!("{path}.{name}");
                    if child.get("description").is_none() {
                        missing.push(child_path.clone());
                    }
                    walk(child, &child_path, missing);
                }
            }
            if let Some(items) = node.get("items") {
                walk(items, &format!("{path}[]"), missing);
            }
        }
    }

    #[test]
    fn minimal_spec_gets_kombu_defaults() {
        let spec: TaskQueueSpec = serde_json::from_value(json!({
            "queue": "ai_processing",
            "broker": {"urlSecretRef": {"name": "celery-broker"}},
            "worker": {"image": "app:1", "app": "app.worker"}
        }))
        .unwrap();
        assert_eq!(spec.broker.url_secret_ref.key, "url");
        assert_eq!(spec.broker.transport_options.sep, "\u{6}\u{16}");
        assert_eq!(spec.broker.transport_options.priority_steps, vec![0, 3, 6, 9]);
        assert_eq!(spec.worker.as_ref().unwrap().concurrency, 1);
        assert_eq!(spec.scaling.max_replicas, 10);
        assert_eq!(spec.scaling.poll_interval, "2s");
        assert_eq!(spec.scaling.scale_down.stabilization_window, "300s");
    }
}
