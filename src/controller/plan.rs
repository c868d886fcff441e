//! One reconcile's decisions (pure): from what was seen — the spec, the broker reading, the
//! Deployment, the routing verdict and this process's memory — to the Deployment to write (or
//! none), the whole status, the events to publish and the next memory.
//!
//! `plan` has no client and no clock of its own, and it is the only place a status is built:
//! every outcome (invalid spec, foreign Deployment, refused write, broker outage, pause, a
//! scale-down waiting out its window) is a path through it, table-tested below without a cluster.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::conditions::{
    find, Conditions, BROKER_REACHABLE, DEPLOYMENT_OWNED, INSTALLATION_CONFLICT, KEYS_MATCH, PAUSED, QUEUE_SHARED,
    READY, ROUTES_ACCEPTED, SCALING_LIMITED, SPEC_VALID, WORKERS_HEARD, WORKER_MATCHES,
};
use super::deployment::{self, owned_by, selector_string};
use super::installations::{Other, Verdict};
use super::memory::{Applied, Memory};
use super::poller::Heard;
use super::scale_target::TargetCheck;
use crate::broker::unacked::{TAG_PAGE, TAG_PAGES};
use crate::crd::{TaskQueue, TaskQueueStatus, PAUSED_ANNOTATION};
use crate::demand::{self, Demand, QueueReading};
use crate::scaling::{decide, Bounds, Decision, History, Load, Observation};
use crate::validate::{InvalidSpec, ValidSpec};

/// A refused Deployment template is tried again after this long (or at once when it changes).
pub const REJECT_RETRY: Duration = Duration::from_secs(60);
/// Ready pods whose workers are not heard by heartbeat for this long make `WorkersHeard=False`.
const NOT_HEARD_AFTER: Duration = Duration::from_secs(60);
/// While the heartbeat subscription settles, look again this often.
const HEARD_SETTLE: Duration = Duration::from_secs(5);
/// Bindings are sampled once a minute (`poller::read_bindings`): a pool heard whose bindings are
/// not seen yet is looked at again after this.
const BINDINGS_RECHECK: Duration = Duration::from_secs(61);
/// While `WorkersHeard=False`, look again this often (a fix in the app raises no event here).
const NOT_HEARD_RECHECK: Duration = Duration::from_secs(30);

/// A Deployment someone else owns is looked at again this often: its removal raises no event
/// here (only Deployments labelled as ours are watched).
const FOREIGN_RECHECK: Duration = Duration::from_secs(60);
/// A scale target (`spec.scaleTargetRef`) is not watched: it is read on each reconcile and
/// looked at again this often, so its readiness and edits show.
const TARGET_RECHECK: Duration = Duration::from_secs(15);

/// Everything one reconcile looked at.
#[derive(Clone, Debug)]
pub struct Seen {
    pub valid: Result<ValidSpec, InvalidSpec>,
    pub broker: BrokerView,
    /// The Deployment named like the TaskQueue, ours or not; with `scaleTargetRef`, the target.
    pub deployment: Option<Deployment>,
    /// What the scale target's worker command says (`scaleTargetRef`, target found).
    pub target: Option<TargetCheck>,
    /// Whether another installation of the operator reconciles this TaskQueue too.
    pub installations: Verdict,
    pub routes: RoutesView,
    /// What the heartbeats say of this pool (None: not registered or not listened long enough).
    pub heard: Option<Heard>,
    pub memory: Memory,
    /// Wall clock (whole seconds) for condition and scale times.
    pub now: Time,
    /// Monotonic clock for windows and outages.
    pub instant: Instant,
}

/// What the broker side says for this TaskQueue.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerView {
    /// Not looked at (the spec is invalid).
    NotRead,
    /// The first read of a new target is still to come.
    Waiting(String),
    /// The Secret, URL or CA cannot be used, or the read failed: (reason, message).
    Failed(&'static str, String),
    /// Read: each queue's depth and who else consumes it, and a message naming what was read.
    Read { queues: Vec<QueueReading>, message: String },
}

/// This TaskQueue's routes in its namespace's routing table.
#[derive(Clone, Debug, PartialEq)]
pub enum RoutesView {
    /// The table has not been built from the current routes yet.
    Pending(String),
    Published(String),
    /// Left out or not published: (reason, message).
    Refused(&'static str, String),
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// A Deployment write decided by the plan, beyond the apply itself.
#[derive(Default)]
struct Write {
    /// Why (when it repairs someone else's change).
    restores: Option<String>,
    /// The JSON patch that puts the worker container back whole first.
    repair: Option<serde_json::Value>,
}

/// A replica change, for logs and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleChange {
    pub from: Option<i32>,
    pub to: i32,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// The Deployment to apply; None when nothing needs writing (or nothing may be written).
    pub deployment: Option<Deployment>,
    /// `deployment::template_fingerprint` of the desired Deployment, when one was built.
    pub template: Option<u64>,
    /// Why `deployment` is written over an existing one that someone else changed.
    pub restores: Option<String>,
    /// A JSON patch sent before `deployment` that puts the worker container back whole.
    pub repair: Option<serde_json::Value>,
    pub status: TaskQueueStatus,
    pub events: Vec<Announcement>,
    pub memory: Memory,
    pub scale: Option<ScaleChange>,
    /// Replicas to set on the scale target (`scaleTargetRef`): only `spec.replicas` is written.
    pub scale_target: Option<i32>,
    /// Another installation reconciles this TaskQueue: write nothing (only `events`).
    pub stand_back: bool,
    /// Replicas go down: give idle workers the lowest deletion cost first.
    pub scale_in: bool,
    pub paused: bool,
    /// When to look again without a change; None: wait for one.
    pub requeue: Option<Duration>,
}

pub fn plan(tq: &TaskQueue, seen: &Seen) -> Plan {
    let prev = tq.status.clone().unwrap_or_default();
    let mut d = Draft {
        tq,
        seen,
        conds: Conditions::new(&prev.conditions, tq.metadata.generation, seen.now.clone()),
        memory: seen.memory.clone(),
        events: Vec::new(),
        status: TaskQueueStatus {
            observed_generation: tq.metadata.generation,
            selector: Some(selector_string(tq)),
            last_scale_time: prev.last_scale_time.clone(),
            last_scale_reason: prev.last_scale_reason.clone(),
            ..TaskQueueStatus::default()
        },
        out: Plan {
            deployment: None,
            template: None,
            restores: None,
            repair: None,
            scale_target: None,
            stand_back: false,
            status: TaskQueueStatus::default(),
            events: Vec::new(),
            memory: Memory::default(),
            scale: None,
            scale_in: false,
            paused: paused(tq),
            requeue: None,
        },
    };
    match &seen.installations {
        Verdict::StandBack(other) => {
            d.stand_back(other);
            return d.finish();
        }
        Verdict::First(others) => {
            d.memory.others = Some((others.clone(), seen.instant));
            d.installation_conflict(others);
        }
        Verdict::Alone => match d.memory.others.clone() {
            // Our own write took their fields over: remembered for as long as a write counts.
            Some((others, at)) if seen.instant < at + super::installations::RECENT => d.installation_conflict(&others),
            _ => {
                d.memory.others = None;
                d.memory.warned.remove(INSTALLATION_CONFLICT);
            }
        },
    }
    match &seen.valid {
        Err(invalid) => d.invalid_spec(invalid),
        Ok(valid) => d.valid_spec(valid),
    }
    d.finish()
}

fn paused(tq: &TaskQueue) -> bool {
    tq.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// How a condition moved, judged against what this process already announced: a cached status
/// can lag behind our own write and would otherwise announce the same problem twice.
#[derive(Debug, PartialEq, Eq)]
enum Transition {
    Failed,
    Recovered,
    Same,
}

struct Draft<'a> {
    tq: &'a TaskQueue,
    seen: &'a Seen,
    conds: Conditions<'a>,
    memory: Memory,
    events: Vec<Announcement>,
    status: TaskQueueStatus,
    out: Plan,
}

impl Draft<'_> {
    fn announce(&mut self, type_: EventType, reason: &'static str, note: impl Into<String>) {
        self.events.push(Announcement { type_, reason, note: note.into() });
    }

    /// Whether condition `type_` just failed or recovered. A spec problem or a refused Deployment
    /// is news whenever its message changes; other failures only when their reason does (the
    /// cause text of one outage varies from read to read).
    fn transition(&mut self, type_: &'static str) -> Transition {
        let Some(c) = find(&self.conds.list, type_) else { return Transition::Same };
        if c.status != "False" {
            let was_failing = self.memory.warned.remove(type_).is_some();
            return if was_failing && c.status == "True" { Transition::Recovered } else { Transition::Same };
        }
        let announced =
            if matches!(type_, SPEC_VALID | READY) { format!("{}: {}", c.reason, c.message) } else { c.reason.clone() };
        let new = self.memory.warned.get(type_) != Some(&announced);
        self.memory.warned.insert(type_, announced);
        // After a restart memory is empty: the stored status tells whether it was announced.
        if new && self.conds.turned_false(type_) {
            Transition::Failed
        } else {
            Transition::Same
        }
    }

    /// A Warning event with the condition's message, when it just failed.
    fn warn_on_failure(&mut self, type_: &'static str) {
        if self.transition(type_) == Transition::Failed {
            self.warn(type_);
        }
    }

    /// A Warning event with condition `type_`'s reason and message.
    fn warn(&mut self, type_: &str) {
        if let Some(c) = find(&self.conds.list, type_) {
            let (reason, note) = (event_reason(&c.reason), c.message.clone());
            self.announce(EventType::Warning, reason, note);
        }
    }

    /// Another installation (whose name sorts first) reconciles this TaskQueue: one Warning
    /// Event per installation seen, nothing written.
    fn stand_back(&mut self, other: &Other) {
        self.out.stand_back = true;
        if self.memory.warned.get(INSTALLATION_CONFLICT) != Some(&other.manager) {
            self.memory.warned.insert(INSTALLATION_CONFLICT, other.manager.clone());
            let note = format!(
                "another installation of the operator ({}, status written at {}) also reconciles this TaskQueue; this \
                 one stands back and writes nothing. Give each installation its own namespaces (chart value \
                 watchNamespaces) and remove this one from this namespace",
                other.manager, other.at
            );
            self.announce(EventType::Warning, "OtherInstallation", note);
        }
    }

    /// This installation goes on, and says that others watch the TaskQueue too.
    fn installation_conflict(&mut self, others: &[Other]) {
        let names: Vec<String> = others.iter().map(|o| format!("{} (at {})", o.manager, o.at)).collect();
        let msg = format!(
            "other installations of the operator also watch this TaskQueue: {}; they stand back while this \
             installation (whose field manager sorts first) reconciles it. Give each installation its own namespaces \
             (chart value watchNamespaces)",
            names.join(", ")
        );
        self.conds.set(INSTALLATION_CONFLICT, true, "OtherInstallation", msg);
        let announced = others.iter().map(|o| o.manager.as_str()).collect::<Vec<_>>().join(",");
        if self.memory.warned.get(INSTALLATION_CONFLICT) != Some(&announced) {
            self.memory.warned.insert(INSTALLATION_CONFLICT, announced);
            self.warn(INSTALLATION_CONFLICT);
        }
    }

    /// An invalid spec changes nothing but this object's status.
    fn invalid_spec(&mut self, invalid: &InvalidSpec) {
        self.memory.history = History::default();
        self.conds.set(SPEC_VALID, false, "InvalidSpec", invalid.to_string());
        self.conds.set(
            READY,
            false,
            "InvalidSpec",
            "spec is invalid; the worker Deployment is left unchanged until it is fixed",
        );
        self.routes();
        self.conds.keep_previous();
        self.warn_on_failure(SPEC_VALID);
        let observed = self.seen.deployment.as_ref().filter(|d| owned_by(d, self.tq));
        self.deployment_status(observed, observed.map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)));
        self.out.requeue = None;
    }

    fn valid_spec(&mut self, valid: &ValidSpec) {
        self.conds.set(SPEC_VALID, true, "Valid", "spec is valid");
        self.transition(SPEC_VALID); // valid again: forget the announced problem
        self.routes();
        let demand = self.broker(valid);
        match (&valid.scale_target, &self.seen.deployment) {
            (Some(_), None) => self.target_missing(valid),
            (Some(_), Some(d)) if written_by_a_taskqueue(d) => self.target_taken(d),
            (None, Some(d)) if !owned_by(d, self.tq) => self.foreign(d),
            (_, observed) => self.scale(valid, observed.as_ref(), demand),
        }
    }

    /// `RoutesAccepted`, from the namespace's routing table as the publisher last built it.
    fn routes(&mut self) {
        match &self.seen.routes {
            // Right after a restart the publisher's first pass is still to come: a verdict
            // stored for this very spec stands until then (rewriting it twice is no news).
            RoutesView::Pending(_) if self.stored_for_this_spec(ROUTES_ACCEPTED) => self.conds.keep(ROUTES_ACCEPTED),
            RoutesView::Pending(msg) => self.conds.unknown(ROUTES_ACCEPTED, "Pending", msg.clone()),
            RoutesView::Published(msg) => {
                self.conds.set(ROUTES_ACCEPTED, true, "Published", msg.clone());
                self.transition(ROUTES_ACCEPTED);
            }
            RoutesView::Refused(reason, msg) => {
                self.conds.set(ROUTES_ACCEPTED, false, reason, msg.clone());
                self.warn_on_failure(ROUTES_ACCEPTED);
            }
        }
    }

    /// Whether the stored condition `type_` was written for the spec the object has now.
    fn stored_for_this_spec(&self, type_: &str) -> bool {
        let generation = self.tq.metadata.generation;
        self.conds.previous(type_).is_some_and(|c| generation.is_some() && c.observed_generation == generation)
    }

    /// `BrokerReachable`, `QueueShared` and the depth fields of the status; this pool's demand
    /// when the broker was read.
    fn broker(&mut self, valid: &ValidSpec) -> Option<Demand> {
        let demand = match &self.seen.broker {
            BrokerView::NotRead => None,
            BrokerView::Waiting(msg) => {
                self.conds.unknown(BROKER_REACHABLE, "Reading", msg.clone());
                None
            }
            BrokerView::Failed(reason, msg) => {
                self.conds.set(BROKER_REACHABLE, false, reason, msg.clone());
                None
            }
            BrokerView::Read { queues, message } => {
                // Held messages beyond what a poll lists are counted nowhere: say so.
                match queues.iter().map(|q| q.depth.unlisted).max().filter(|n| *n > 0) {
                    Some(n) => self.conds.set(
                        BROKER_REACHABLE,
                        true,
                        "ReadPartly",
                        format!(
                            "{message}; {n} held messages beyond the {} unacked tags a poll lists are not counted",
                            TAG_PAGE * TAG_PAGES
                        ),
                    ),
                    None => self.conds.set(BROKER_REACHABLE, true, "Read", message.clone()),
                }
                let now_ms = self.seen.now.0.as_millisecond();
                let demand = demand::demand(queues, now_ms, valid.eta_horizon);
                self.status.pending = Some(demand.load.pending);
                self.status.in_flight = Some(demand.load.in_flight);
                self.status.scheduled = Some(demand.load.scheduled);
                self.status.orphaned = Some(demand.load.orphaned);
                self.status.pending_by_queue = demand.pending_by_queue.clone();
                self.sharing(queues);
                Some(demand)
            }
        };
        if demand.is_none() {
            self.conds.keep(QUEUE_SHARED);
        }
        match self.transition(BROKER_REACHABLE) {
            Transition::Failed => self.warn(BROKER_REACHABLE),
            Transition::Recovered => {
                self.announce(EventType::Normal, "BrokerReachable", "broker readable again; scaling resumed")
            }
            Transition::Same => {}
        }
        demand
    }

    /// `QueueShared`: whether another TaskQueue here consumes one of this pool's queues, whom,
    /// and what part this pool counts; one Event each time that changes.
    fn sharing(&mut self, queues: &[QueueReading]) {
        let shared: Vec<String> = queues
            .iter()
            .filter(|q| q.share.is_shared())
            .map(|q| format!("queue {} is also consumed by {}: {}", q.queue, q.share.others(), q.share.policy()))
            .collect();
        if shared.is_empty() {
            self.conds.set(QUEUE_SHARED, false, "NotShared", "no other TaskQueue here consumes this pool's queues");
            self.memory.shared = None;
            return;
        }
        let msg = shared.join("; ");
        self.conds.set(QUEUE_SHARED, true, "DemandSplit", msg.clone());
        // After a restart the stored condition tells what was announced already.
        let stored = self.conds.previous(QUEUE_SHARED).is_some_and(|c| c.status == "True" && c.message == msg);
        let announced = self.memory.shared.as_ref().map_or(stored, |m| *m == msg);
        if !announced {
            self.announce(EventType::Normal, "QueueShared", msg.clone());
        }
        self.memory.shared = Some(msg);
    }

    /// Never take over a Deployment we do not own.
    fn foreign(&mut self, d: &Deployment) {
        let (ns, name) = (self.tq.namespace().unwrap_or_default(), self.tq.name_any());
        let owner =
            d.owner_references().first().map_or("no owner".to_string(), |o| format!("owner {}/{}", o.kind, o.name));
        let msg = format!(
            "Deployment {ns}/{name} already exists ({owner}) and is not managed by this TaskQueue; delete or rename \
             that Deployment, or rename the TaskQueue"
        );
        self.conds.set(DEPLOYMENT_OWNED, false, "DeploymentConflict", msg);
        self.conds.set(READY, false, "DeploymentConflict", "the worker Deployment belongs to someone else");
        self.warn_on_failure(DEPLOYMENT_OWNED);
        self.out.requeue = Some(FOREIGN_RECHECK);
    }

    /// `scaleTargetRef` names no Deployment (yet): nothing to scale.
    fn target_missing(&mut self, valid: &ValidSpec) {
        let ns = self.tq.namespace().unwrap_or_default();
        let msg = format!(
            "Deployment {ns}/{} (spec.scaleTargetRef.name) does not exist; create it (e.g. with the app's chart) or fix \
             the name",
            valid.deployment
        );
        let ready = "the Deployment to scale does not exist";
        self.no_target("ScaleTargetNotFound", msg, ready, TARGET_RECHECK);
    }

    /// A Deployment the operator writes for some TaskQueue is not a scale target.
    fn target_taken(&mut self, d: &Deployment) {
        let owner = deployment::controller_of(d).map(|o| o.name.clone());
        let msg = format!(
            "Deployment {} is written by the operator for TaskQueue {} (its controller); spec.scaleTargetRef scales \
             only Deployments the operator does not write: point it at the app's own Deployment, or scale through \
             TaskQueue {0}",
            d.name_any(),
            owner.unwrap_or_default()
        );
        let ready = "the Deployment to scale is another TaskQueue's";
        self.no_target("ScaleTargetConflict", msg, ready, FOREIGN_RECHECK);
    }

    /// Nothing to scale: `DeploymentOwned` and `Ready` say why, with a Warning Event, and no
    /// replica figures; looked at again after `recheck` (the target is not watched).
    fn no_target(&mut self, reason: &'static str, msg: String, ready: &str, recheck: Duration) {
        self.conds.set(DEPLOYMENT_OWNED, false, reason, msg);
        self.conds.set(READY, false, reason, ready);
        self.warn_on_failure(DEPLOYMENT_OWNED);
        self.deployment_status(None, None);
        self.status.selector = None;
        self.out.requeue = Some(recheck);
    }

    /// `WorkerMatches` (scale targets): what the target's worker command says against what the
    /// operator relies on. Absent when the command is not in the template (nothing to judge).
    fn worker_matches(&mut self) -> bool {
        let Some(check) = &self.seen.target else { return true };
        if !check.problems.is_empty() {
            self.conds.set(WORKER_MATCHES, false, "WorkerMismatch", check.problems.join("; "));
            self.warn_on_failure(WORKER_MATCHES);
            return false;
        }
        if check.read {
            self.conds.set(WORKER_MATCHES, true, "Matches", check.summary.clone());
        }
        self.transition(WORKER_MATCHES);
        true
    }

    /// `DeploymentOwned` for the main path: the Deployment is ours, or the scale target.
    fn owned_condition(&mut self, valid: &ValidSpec) {
        let name = &valid.deployment;
        let (reason, mut msg) = match valid.scale_target {
            None => ("Owned", format!("Deployment {name} is managed by this TaskQueue")),
            Some(_) => (
                "ScaleTarget",
                format!(
                    "Deployment {name} (spec.scaleTargetRef) is scaled by this TaskQueue: the operator sets only its \
                     replicas and its pods' deletion costs"
                ),
            ),
        };
        // A command that could not be read: say what is not checked.
        if let Some(c) = self.seen.target.as_ref().filter(|c| !c.read) {
            msg = format!("{msg}; {}", c.summary);
        }
        self.conds.set(DEPLOYMENT_OWNED, true, reason, msg);
        self.transition(DEPLOYMENT_OWNED);
    }

    /// `WorkersHeard`: once the pool has had Ready pods for `NOT_HEARD_AFTER`, whether any of
    /// its workers is heard by heartbeat on the channel the operator listens to. None heard
    /// means the operator's key prefix (or broker, or db) is not the app's: it then counts
    /// lists nobody uses and cannot tell busy pods from idle ones. Returns when to look again.
    fn workers_heard(&mut self, ready: i32) -> Option<Duration> {
        let now = self.seen.instant;
        self.memory.ready_since = (ready > 0).then(|| self.memory.ready_since.unwrap_or(now));
        let Some(since) = self.memory.ready_since else {
            self.conds.keep(WORKERS_HEARD);
            return None;
        };
        let due = since + NOT_HEARD_AFTER;
        // Heartbeats trigger no reconcile: each case says when to look again.
        let heard = match &self.seen.heard {
            // The subscription is younger than two heartbeats (or not up yet): soon.
            None => {
                self.conds.keep(WORKERS_HEARD);
                return Some(HEARD_SETTLE);
            }
            Some(h) if h.live > 0 => {
                let msg = format!("the pool's workers send heartbeats on {}", h.channel);
                self.conds.set(WORKERS_HEARD, true, "Heard", msg);
                return self.separator(h);
            }
            Some(_) if now < due => {
                self.conds.keep(WORKERS_HEARD);
                return Some(due - now);
            }
            Some(h) => h.clone(),
        };
        let msg = format!(
            "worker pods have been Ready for over {}s, but no worker of the pool ({}-...) sends heartbeats on {}: \
             the operator reads keys under a prefix the app does not use, so it counts lists nobody fills and cannot \
             tell busy pods from idle ones. Check spec.broker.transportOptions.globalKeyprefix against the app's \
             broker_transport_options global_keyprefix (kombu prefixes the event channels too), and that the workers \
             use this broker URL and db",
            NOT_HEARD_AFTER.as_secs(),
            heard.pool,
            heard.channel
        );
        self.conds.set(WORKERS_HEARD, false, "WorkersNotHeard", msg);
        self.warn_on_failure(WORKERS_HEARD);
        // A fix in the app (not the spec) changes nothing the operator watches: look again.
        Some(NOT_HEARD_RECHECK)
    }

    /// `KeysMatch`: with the pool heard (so the key prefix is the app's), whether kombu's binding
    /// of its queues was written with the spec's `sep`. A different one names the priority
    /// lists differently: tasks sent with a priority would not be counted. Absent until a
    /// binding has been seen; bindings are read once a minute, so then look again in a minute.
    fn separator(&mut self, h: &Heard) -> Option<Duration> {
        let ours = &self.tq.spec.broker.transport_options.sep;
        if let Some((queue, key, theirs)) = &h.other_sep {
            let msg = format!(
                "kombu's binding of queue {queue} ({key:?}) was written with sep {theirs:?}, not \
                 spec.broker.transportOptions.sep {ours:?}: kombu names the priority lists with it ({:?}, ...), so \
                 tasks sent with a priority are not counted. Set spec.broker.transportOptions.sep to the \
                 app's broker_transport_options sep",
                format!("{queue}{theirs}3")
            );
            self.conds.set(KEYS_MATCH, false, "SeparatorMismatch", msg);
            self.warn_on_failure(KEYS_MATCH);
        } else if h.sep_matches {
            let msg = format!("kombu's bindings of the pool's queues use sep {ours:?}, as the spec says");
            self.conds.set(KEYS_MATCH, true, "Matches", msg);
            self.transition(KEYS_MATCH);
        } else {
            self.conds.keep(KEYS_MATCH);
            return Some(BINDINGS_RECHECK);
        }
        None
    }

    /// The main path: decide the replicas, build the Deployment, say why.
    fn scale(&mut self, valid: &ValidSpec, observed: Option<&Deployment>, demand: Option<Demand>) {
        self.owned_condition(valid);
        let current = self.current_replicas(observed);
        let paused = self.out.paused;
        let observation = self.observation(demand.as_ref().map(|d| d.load));
        let bounds = bounds(valid, paused);
        let mut decision = decide(&bounds, current, observation, &mut self.memory.history, self.seen.instant);
        if let Some(note) = demand.as_ref().and_then(|d| d.shared_note.as_ref()) {
            decision.reason = format!("{}; {note}", decision.reason);
            decision.state = format!("{}; {note}", decision.state);
        }
        self.pause_condition(paused);

        let matches = match &self.tq.spec.worker {
            Some(w) => {
                if !self.write_worker(w, valid, observed, current, decision.replicas) {
                    return;
                }
                true
            }
            None => {
                let set = observed.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas).unwrap_or(1);
                self.out.scale_target = (set != decision.replicas).then_some(decision.replicas);
                self.status.selector = observed.and_then(deployment::selector_of);
                self.worker_matches()
            }
        };
        self.scaled(current, &decision);
        if decision.at_max {
            self.conds.set(SCALING_LIMITED, true, "AtMaxReplicas", decision.state.clone());
        } else if decision.limited {
            self.conds.set(SCALING_LIMITED, true, "Limited", decision.state.clone());
        } else {
            self.conds.set(SCALING_LIMITED, false, "FollowsDemand", decision.state.clone());
        }
        self.deployment_status(observed, Some(decision.replicas));
        let reachable = self.conds.is(BROKER_REACHABLE, "True");
        let ready = self.status.ready_replicas.unwrap_or(0);
        if !reachable {
            let msg =
                format!("replicas held at {}: the broker could not be read (see BrokerReachable)", decision.replicas);
            self.conds.set(READY, false, "BrokerNotRead", msg);
        } else if !matches {
            let msg = format!(
                "replicas follow the broker ({ready}/{} ready), but the worker command does not fit (see WorkerMatches)",
                decision.replicas
            );
            self.conds.set(READY, false, "WorkerMismatch", msg);
        } else if ready < decision.replicas {
            self.conds.set(READY, false, "WorkersNotReady", format!("{ready}/{} worker pods ready", decision.replicas));
        } else {
            self.conds.set(READY, true, "WorkersReady", format!("{ready}/{} worker pods ready", decision.replicas));
        }
        let heard_at = self.workers_heard(ready);
        // Nothing is looked at on a timer unless something is due: the poller wakes us when a
        // reading changes, the watches when the spec or the Deployment do, the Secret
        // refresher when a Secret does. A pending scale-down or step, or an unread broker,
        // needs a look once per poll so it happens when due.
        let busy = decision.replicas != decision.recommended || !reachable;
        let mut requeue = busy.then_some(valid.poll_interval);
        // A scheduled task becomes demand when it comes within the horizon: decide again then
        // (a second late rather than early: the wall clock here has whole seconds).
        if let Some(due) = demand.and_then(|d| d.next_due) {
            let due = due + Duration::from_secs(1);
            requeue = Some(requeue.map_or(due, |r| r.min(due)));
        }
        if let Some(at) = heard_at {
            requeue = Some(requeue.map_or(at, |r| r.min(at)));
        }
        if valid.scale_target.is_some() {
            requeue = Some(requeue.map_or(TARGET_RECHECK, |r| r.min(TARGET_RECHECK)));
        }
        self.out.requeue = requeue;
    }

    /// The worker Deployment from `spec.worker`: set `out.deployment` when it must be written.
    /// False when the API server refused this very template lately (the status says so).
    fn write_worker(
        &mut self,
        w: &crate::crd::WorkerSpec,
        valid: &ValidSpec,
        observed: Option<&Deployment>,
        current: Option<i32>,
        replicas: i32,
    ) -> bool {
        let desired = deployment::build(self.tq, w, valid, replicas);
        let template = deployment::template_fingerprint(&desired);
        self.out.template = Some(template);
        let refused =
            self.memory.rejected.clone().filter(|r| r.template == template && self.seen.instant < r.at + REJECT_RETRY);
        if let Some(r) = refused {
            self.refused(current, &r.message);
            self.deployment_status(observed, current);
            return false;
        }
        self.memory.rejected = None;
        self.memory.warned.remove(READY);
        if let Some(write) = self.needs_write(observed, &desired) {
            if let Some(why) = &write.restores {
                self.announce(EventType::Normal, "Restored", format!("{why}; restored from the spec"));
            }
            (self.out.restores, self.out.repair) = (write.restores, write.repair);
            self.out.deployment = Some(desired);
        }
        true
    }

    /// The API server refused this Deployment: it stays as it was, and the status says why.
    fn refused(&mut self, current: Option<i32>, message: &str) {
        let held = current.map_or("not created".to_string(), |c| format!("left at {c} replicas"));
        let msg = format!(
            "the API server refused the worker Deployment ({held}, retried in {}s or when the spec changes): {message}",
            REJECT_RETRY.as_secs()
        );
        self.conds.set(READY, false, "DeploymentRejected", msg);
        self.warn_on_failure(READY);
        self.conds.set(
            SCALING_LIMITED,
            true,
            "DeploymentRejected",
            "replicas held: the worker Deployment cannot be written (see Ready)",
        );
        self.out.requeue = Some(REJECT_RETRY);
    }

    /// The Deployment's current replicas, as far as the decision goes. A cached copy older than
    /// our last write is stale: our write is the truth then (otherwise every reconcile right
    /// after a scale would scale again). A count someone else set since our write (`kubectl
    /// scale`) is not ours to build on: it is restored like any other managed field, also while
    /// the broker cannot be read. Unless paused: then whoever scales the pool decides.
    fn current_replicas(&self, observed: Option<&Deployment>) -> Option<i32> {
        let o = observed?;
        let generation = o.metadata.generation.unwrap_or(0);
        match self.memory.applied {
            Some(a) if generation < a.generation => Some(a.replicas),
            Some(a) if !self.out.paused => Some(a.replicas),
            _ => Some(o.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)),
        }
    }

    /// Whether `desired` must be written, and what else comes with the write when the
    /// Deployment differs from it without our doing.
    fn needs_write(&mut self, observed: Option<&Deployment>, desired: &Deployment) -> Option<Write> {
        let Some(o) = observed else { return Some(Write::default()) };
        let generation = o.metadata.generation.unwrap_or(0);
        match self.memory.applied {
            // Nobody changed it since our write (or the cache has not caught up): only a new
            // desired state needs a write. This also stops a write loop on a difference the
            // server itself makes.
            Some(a) if generation <= a.generation => {
                (a.fingerprint != deployment::fingerprint(desired)).then(Write::default)
            }
            // Changed by someone else since our write, or not written by this process yet.
            _ => {
                let Some(path) = deployment::drift(o, desired) else {
                    // Already as desired: remember it as if we had written it, so the next
                    // reconciles compare fingerprints instead of whole objects.
                    let replicas = desired.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
                    let fingerprint = deployment::fingerprint(desired);
                    self.memory.applied = Some(Applied { generation, fingerprint, replicas });
                    return None;
                };
                let by_others = self.memory.applied.is_some();
                Some(Write {
                    restores: by_others
                        .then(|| format!("field {path} of the worker Deployment was changed outside the operator")),
                    repair: deployment::repair_worker(o, desired),
                })
            }
        }
    }

    fn observation(&mut self, load: Option<Load>) -> Observation {
        match (load, &self.seen.broker) {
            (Some(load), _) => {
                self.memory.unknown_since = None;
                Observation::Known(load)
            }
            // Right after a (re)start or spec change the first read is still to come: not an outage.
            (None, BrokerView::Waiting(_)) => Observation::Unknown { for_: Duration::ZERO },
            (None, _) => {
                let since = *self.memory.unknown_since.get_or_insert(self.seen.instant);
                Observation::Unknown { for_: self.seen.instant.saturating_duration_since(since) }
            }
        }
    }

    /// Status, memory and an event for a replica change.
    fn scaled(&mut self, current: Option<i32>, decision: &Decision) {
        if current == Some(decision.replicas) {
            return;
        }
        let reason = match current {
            None => "Created",
            Some(c) if c < decision.replicas => "ScaledUp",
            Some(_) => "ScaledDown",
        };
        self.announce(EventType::Normal, reason, decision.reason.clone());
        self.memory.last_scale = Some((self.seen.now.clone(), decision.reason.clone()));
        self.out.scale_in = current.is_some_and(|c| decision.replicas < c);
        self.out.scale = Some(ScaleChange { from: current, to: decision.replicas, reason: decision.reason.clone() });
    }

    /// The `Paused` condition, and one event each time the pause goes on or off.
    fn pause_condition(&mut self, paused: bool) {
        if paused {
            let msg =
                format!("replicas frozen by annotation {PAUSED_ANNOTATION}=true; the worker template still reconciles");
            self.conds.set(PAUSED, true, "Annotated", msg);
        } else {
            self.conds.set(PAUSED, false, "Active", "replicas follow the broker");
        }
        // After a restart the stored condition tells what was announced already.
        let prev = self.tq.status.as_ref().map_or(&[][..], |s| s.conditions.as_slice());
        let announced =
            self.memory.paused.unwrap_or_else(|| prev.iter().any(|c| c.type_ == PAUSED && c.status == "True"));
        self.memory.paused = Some(paused);
        if announced != paused {
            if paused {
                self.announce(
                    EventType::Normal,
                    "Paused",
                    format!("scaling paused by annotation {PAUSED_ANNOTATION}=true"),
                );
            } else {
                self.announce(EventType::Normal, "Resumed", "scaling resumed: replicas follow the broker again");
            }
        }
    }

    /// Replica fields of the status: what the Deployment runs, and what was asked for.
    fn deployment_status(&mut self, observed: Option<&Deployment>, desired: Option<i32>) {
        let s = observed.and_then(|d| d.status.as_ref());
        self.status.replicas = Some(s.and_then(|s| s.replicas).unwrap_or(0));
        self.status.ready_replicas = Some(s.and_then(|s| s.ready_replicas).unwrap_or(0));
        self.status.desired_replicas = desired;
    }

    fn finish(mut self) -> Plan {
        if let Some((at, why)) = self.memory.last_scale.clone() {
            self.status.last_scale_time = Some(at);
            self.status.last_scale_reason = Some(why);
        }
        self.status.conditions = std::mem::take(&mut self.conds.list);
        Plan { status: self.status, events: self.events, memory: self.memory, ..self.out }
    }
}

/// Whether `d`'s controller is a TaskQueue (a Deployment the operator writes).
fn written_by_a_taskqueue(d: &Deployment) -> bool {
    deployment::controller_of(d).is_some_and(|o| o.kind == "TaskQueue")
}

/// The scaling knobs of a validated spec.
fn bounds(valid: &ValidSpec, paused: bool) -> Bounds {
    Bounds {
        count_in_flight: valid.count_in_flight,
        min_replicas: valid.min_replicas,
        max_replicas: valid.max_replicas,
        tasks_per_replica: valid.tasks_per_replica,
        activation_threshold: valid.activation_threshold,
        stabilization_window: valid.stabilization_window,
        scale_up_max_step: valid.scale_up_max_step,
        scale_down_max_step: valid.scale_down_max_step,
        step_interval: valid.poll_interval,
        fallback: valid.fallback,
        paused,
    }
}

/// Condition reasons double as event reasons; events want a `'static` one.
fn event_reason(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "InvalidSpec",
        "DeploymentConflict",
        "DeploymentRejected",
        "RouteConflict",
        "ConfigMapConflict",
        "BrokerSecretMissing",
        "InvalidBrokerURL",
        "BrokerUnreachable",
        "BrokerAuthFailed",
        "WrongKeyType",
        "BrokerReadFailed",
        "BrokerReplyRejected",
        "BrokerPermissionDenied",
        "BrokerNotAllowed",
        "WorkersNotHeard",
        "WorkerMismatch",
        "OtherInstallation",
        "SeparatorMismatch",
        "ScaleTargetNotFound",
        "ScaleTargetConflict",
    ];
    KNOWN.iter().copied().find(|k| *k == reason).unwrap_or("Warning")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::memory::Rejected;
    use crate::demand::{Consumer, Share};
    use crate::validate::validate;
    use serde_json::json;

    fn taskqueue(annotations: serde_json::Value, scaling: serde_json::Value) -> TaskQueue {
        serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": "ai", "namespace": "prod", "uid": "tq-uid", "generation": 2, "annotations": annotations},
            "spec": {
                "queue": "ai_processing",
                "broker": {"urlSecretRef": {"name": "celery-broker"}},
                "worker": {"image": "app:1", "app": "app.worker", "concurrency": 4},
                "scaling": scaling
            }
        }))
        .unwrap()
    }

    fn plain() -> TaskQueue {
        taskqueue(json!({}), json!({"minReplicas": 0, "maxReplicas": 10, "scaleDown": {"stabilizationWindow": "60s"}}))
    }

    fn read(pending: i64) -> BrokerView {
        let depth = crate::broker::QueueDepth { pending, ..Default::default() };
        let share = Share::alone(Consumer { name: "ai".into(), primary: true, weight: 40 });
        BrokerView::Read {
            queues: vec![QueueReading { queue: "ai_processing".into(), depth, share }],
            message: "read".into(),
        }
    }

    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn seen(tq: &TaskQueue, broker: BrokerView, deployment: Option<Deployment>, memory: Memory) -> Seen {
        Seen {
            valid: validate(&tq.spec, &tq.name_any()),
            broker,
            deployment,
            routes: RoutesView::Published("0 route(s)".into()),
            heard: None,
            target: None,
            installations: Verdict::Alone,
            memory,
            now: Time(jiff::Timestamp::from_second(1_000_000).unwrap()),
            instant: t0() + Duration::from_secs(100),
        }
    }

    /// Our Deployment for `tq` at `replicas`, as stored at `generation`.
    #[test]
    fn ready_pods_whose_workers_are_never_heard_name_the_key_prefix() {
        let tq = plain();
        let mut d = ours(&tq, 2, 1);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            replicas: Some(2),
            ready_replicas: Some(2),
            ..Default::default()
        });
        let heard = |live| Heard {
            live,
            pool: "ai-worker@ai".into(),
            channel: "/0.celeryev/worker.heartbeat".into(),
            other_sep: None,
            sep_matches: false,
        };
        let at = |secs: u64, live: usize, memory: Memory| Seen {
            instant: t0() + Duration::from_secs(secs),
            heard: Some(heard(live)),
            ..seen(&tq, read(2), Some(d.clone()), memory)
        };
        let cond = |p: &Plan| find(&p.status.conditions, WORKERS_HEARD).map(|c| (c.status.clone(), c.reason.clone()));
        // Ready since t=100, nobody heard: nothing said yet, but a look is due by t=160.
        let first = plan(&tq, &at(100, 0, wrote(&d, 1)));
        assert_eq!(cond(&first), None);
        assert!(first.requeue.is_some_and(|r| r <= Duration::from_secs(60)), "{:?}", first.requeue);
        let later = plan(&tq, &at(161, 0, first.memory.clone()));
        assert_eq!(cond(&later), Some(("False".into(), "WorkersNotHeard".into())));
        let c = find(&later.status.conditions, WORKERS_HEARD).unwrap();
        assert!(
            c.message.contains("globalKeyprefix") && c.message.contains("/0.celeryev/worker.heartbeat"),
            "{}",
            c.message
        );
        let warnings: Vec<_> = later.events.iter().filter(|e| e.type_ == EventType::Warning).collect();
        assert!(warnings.len() == 1 && warnings[0].reason == "WorkersNotHeard", "one Warning: {warnings:?}");
        // Heard: True, the same words every time (no status write per heartbeat count).
        let heard_now = plan(&tq, &at(170, 2, later.memory.clone()));
        assert_eq!(cond(&heard_now), Some(("True".into(), "Heard".into())));
        // Not listened long enough (None): nothing judged.
        assert_eq!(later.requeue, Some(Duration::from_secs(30)), "while not heard, looked at again");
        assert_eq!(heard_now.requeue, Some(BINDINGS_RECHECK), "no binding seen yet: a look once they are read");
        let keys = |p: &Plan| {
            find(&p.status.conditions, KEYS_MATCH).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        assert_eq!(keys(&heard_now), None, "nothing judged before a binding is seen");
        let other = Heard {
            other_sep: Some(("ai_processing".into(), "_kombu.binding.ai_processing".into(), ":".into())),
            ..heard(2)
        };
        let mismatch = plan(&tq, &Seen { heard: Some(other), ..at(180, 2, later.memory.clone()) });
        let (status, reason, msg) = keys(&mismatch).unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("False", "SeparatorMismatch"));
        assert!(msg.contains("spec.broker.transportOptions.sep") && msg.contains("sep \":\""), "{msg}");
        assert!(mismatch.events.iter().any(|e| e.reason == "SeparatorMismatch"));
        let fine = plan(
            &tq,
            &Seen { heard: Some(Heard { sep_matches: true, ..heard(2) }), ..at(190, 2, mismatch.memory.clone()) },
        );
        assert_eq!(keys(&fine).map(|k| k.0), Some("True".into()));
        let unsure = plan(&tq, &Seen { heard: None, ..at(300, 0, first.memory.clone()) });
        assert_eq!(cond(&unsure), None);
        assert_eq!(unsure.requeue, Some(Duration::from_secs(5)), "the subscription settles: soon again");
    }

    #[test]
    fn a_scale_target_gets_only_its_replicas_and_a_verdict_on_its_command() {
        let tq: TaskQueue = serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": "ai", "namespace": "prod", "uid": "tq-uid", "generation": 1},
            "spec": {"queue": "ai_processing", "broker": {"urlSecretRef": {"name": "b"}},
                     "scaleTargetRef": {"name": "app-worker"}, "scaling": {"maxReplicas": 10}}
        }))
        .unwrap();
        let target = |command: serde_json::Value, replicas: i32| -> Deployment {
            serde_json::from_value(json!({
                "metadata": {"name": "app-worker", "namespace": "prod", "uid": "d-uid", "generation": 3,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Other", "name": "x", "uid": "u", "controller": true}]},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "worker"}},
                         "template": {"spec": {"containers": [{"name": "app", "image": "app:1", "command": command}]}}},
                "status": {"replicas": replicas, "readyReplicas": replicas}
            }))
            .unwrap()
        };
        let seen_with = |d: Option<Deployment>| {
            let mut s = seen(&tq, read(9), d.clone(), Memory::default());
            if let (Ok(v), Some(d)) = (s.valid.as_mut(), &d) {
                let t = super::super::scale_target::check(d, v.scale_target.as_ref().unwrap(), &v.queues, false);
                super::super::scale_target::resolve(v, &t);
                s.target = Some(t);
            }
            s
        };
        let cond = |p: &Plan, t: &str| find(&p.status.conditions, t).map(|c| (c.status.clone(), c.reason.clone()));

        let missing = plan(&tq, &seen_with(None));
        assert_eq!(cond(&missing, DEPLOYMENT_OWNED), Some(("False".into(), "ScaleTargetNotFound".into())));
        assert_eq!((missing.scale_target, missing.deployment.is_none()), (None, true), "nothing to write");

        // 9 pending at -c 3: 3 replicas; only the count is written, never a Deployment.
        let fits = plan(
            &tq,
            &seen_with(Some(target(json!(["celery", "-A", "a", "worker", "-Q", "ai_processing", "-c", "3"]), 1))),
        );
        assert_eq!((fits.scale_target, fits.deployment.is_none()), (Some(3), true));
        assert_eq!(cond(&fits, WORKER_MATCHES), Some(("True".into(), "Matches".into())));
        assert_eq!(cond(&fits, DEPLOYMENT_OWNED), Some(("True".into(), "ScaleTarget".into())));
        assert_eq!(fits.status.selector.as_deref(), Some("app=worker"));
        assert!(fits.requeue.is_some_and(|r| r <= TARGET_RECHECK), "the target is not watched: looked at again");

        // Workers on another queue: still scaled (the app's owners decide), and said loudly.
        let other =
            plan(&tq, &seen_with(Some(target(json!(["celery", "-A", "a", "worker", "-Q", "other", "-c", "3"]), 3))));
        assert_eq!(other.scale_target, None, "already at 3");
        assert_eq!(cond(&other, WORKER_MATCHES), Some(("False".into(), "WorkerMismatch".into())));
        assert_eq!(cond(&other, READY), Some(("False".into(), "WorkerMismatch".into())));
        assert!(other.events.iter().any(|e| e.reason == "WorkerMismatch"), "{:?}", other.events);

        // A Deployment the operator writes for a TaskQueue is not a scale target.
        let mut taken = target(json!(["celery"]), 1);
        taken.metadata.owner_references.as_mut().unwrap()[0].kind = "TaskQueue".into();
        let taken = plan(&tq, &seen_with(Some(taken)));
        assert_eq!(cond(&taken, DEPLOYMENT_OWNED), Some(("False".into(), "ScaleTargetConflict".into())));
        assert_eq!(taken.scale_target, None);
    }

    #[test]
    fn another_installation_is_said_once_and_the_one_that_stands_back_writes_nothing() {
        let tq = plain();
        let other = Other { manager: "taskqueue-operator@ops/a".into(), at: "2026-12-08T02:00:00Z".into() };
        let back = plan(
            &tq,
            &Seen { installations: Verdict::StandBack(other.clone()), ..seen(&tq, read(9), None, Memory::default()) },
        );
        assert!(back.stand_back && back.deployment.is_none() && back.scale.is_none());
        assert_eq!(back.events.len(), 1, "{:?}", back.events);
        assert!(back.events[0].reason == "OtherInstallation" && back.events[0].note.contains("ops/a"));
        let again = plan(
            &tq,
            &Seen { installations: Verdict::StandBack(other.clone()), ..seen(&tq, read(9), None, back.memory) },
        );
        assert!(again.stand_back && again.events.is_empty(), "said once");

        let first = plan(
            &tq,
            &Seen { installations: Verdict::First(vec![other]), ..seen(&tq, read(9), None, Memory::default()) },
        );
        assert!(!first.stand_back && first.deployment.is_some(), "the first goes on");
        let c = find(&first.status.conditions, INSTALLATION_CONFLICT).unwrap();
        assert!(c.status == "True" && c.message.contains("ops/a"), "{c:?}");
        assert!(first.events.iter().any(|e| e.reason == "OtherInstallation"));
        // Our write took their fields over, so they are not seen next time: still said, for as
        // long as a write of theirs counts.
        let next = plan(&tq, &seen(&tq, read(9), None, first.memory));
        assert!(find(&next.status.conditions, INSTALLATION_CONFLICT).is_some(), "remembered");
        assert!(!next.events.iter().any(|e| e.reason == "OtherInstallation"), "not said again");
        let later = Seen {
            instant: t0() + Duration::from_secs(100) + super::super::installations::RECENT,
            ..seen(&tq, read(9), None, next.memory)
        };
        let alone = plan(&tq, &later);
        assert!(find(&alone.status.conditions, INSTALLATION_CONFLICT).is_none(), "gone once they are");
    }

    fn ours(tq: &TaskQueue, replicas: i32, generation: i64) -> Deployment {
        let mut d = deployment::build(
            tq,
            tq.spec.worker.as_ref().unwrap(),
            validate(&tq.spec, "ai").as_ref().unwrap(),
            replicas,
        );
        d.metadata.generation = Some(generation).filter(|g| *g > 0);
        d
    }

    /// Memory after our write of `d` at `generation`.
    fn wrote(d: &Deployment, generation: i64) -> Memory {
        let replicas = d.spec.as_ref().unwrap().replicas.unwrap();
        let mut sent = d.clone();
        sent.metadata.generation = None;
        let applied = Applied { generation, fingerprint: deployment::fingerprint(&sent), replicas };
        Memory { applied: Some(applied), ..Memory::default() }
    }

    struct Want {
        /// Replicas of the Deployment written, or None for no write.
        written: Option<i32>,
        desired: Option<i32>,
        ready: &'static str,
        events: &'static [&'static str],
        requeue: Option<u64>,
    }

    #[test]
    fn every_outcome_goes_through_one_plan() {
        let mut bad = plain();
        bad.spec.scaling.min_replicas = 5;
        bad.spec.scaling.max_replicas = 2;
        let mut foreign = ours(&plain(), 7, 1);
        foreign.metadata.owner_references = None;
        let at_3 = ours(&plain(), 3, 4);
        let mut edited = at_3.clone();
        edited.metadata.generation = Some(5);
        edited.metadata.resource_version = Some("77".into());
        edited.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].image = Some("evil:1".into());
        let refused = Memory {
            rejected: Some(Rejected {
                template: deployment::template_fingerprint(&ours(&plain(), 3, 0)),
                message: "spec.template: Invalid value".into(),
                at: t0() + Duration::from_secs(90),
            }),
            ..wrote(&at_3, 4)
        };
        let mut window = wrote(&ours(&plain(), 6, 4), 4);
        let first = plan(
            &plain(),
            &Seen {
                instant: t0() + Duration::from_secs(90),
                ..seen(&plain(), read(24), Some(ours(&plain(), 6, 4)), window.clone())
            },
        );
        window.history = first.memory.history;
        let paused = taskqueue(json!({"taskqueue.dev/paused": "true"}), json!({"maxReplicas": 10}));
        let unknown = Memory { unknown_since: Some(t0()), ..wrote(&at_3, 4) };
        let mut scaled_by_hand = at_3.clone();
        scaled_by_hand.metadata.generation = Some(5);
        scaled_by_hand.spec.as_mut().unwrap().replicas = Some(7);

        #[rustfmt::skip]
        let rows: Vec<(&str, TaskQueue, Seen, Want)> = vec![
            ("new TaskQueue, 9 pending / 4 per replica", plain(), seen(&plain(), read(9), None, Memory::default()),
                Want { written: Some(3), desired: Some(3), ready: "WorkersNotReady", events: &["Created"], requeue: None }),
            ("first read still to come", plain(), seen(&plain(), BrokerView::Waiting("waiting".into()), None, Memory::default()),
                Want { written: Some(0), desired: Some(0), ready: "BrokerNotRead", events: &["Created"], requeue: Some(2) }),
            ("steady state: nothing to write or say", plain(), seen(&plain(), read(12), Some(at_3.clone()), wrote(&at_3, 4)),
                Want { written: None, desired: Some(3), ready: "WorkersNotReady", events: &[], requeue: None }),
            ("invalid spec", bad.clone(), seen(&bad, BrokerView::NotRead, Some(at_3.clone()), Memory::default()),
                Want { written: None, desired: Some(3), ready: "InvalidSpec", events: &["InvalidSpec"], requeue: None }),
            ("foreign Deployment", plain(), seen(&plain(), read(12), Some(foreign), Memory::default()),
                Want { written: None, desired: None, ready: "DeploymentConflict", events: &["DeploymentConflict"], requeue: Some(60) }),
            ("refused apply is held until the retry", plain(), seen(&plain(), read(12), Some(at_3.clone()), refused),
                Want { written: None, desired: Some(3), ready: "DeploymentRejected", events: &["DeploymentRejected"], requeue: Some(60) }),
            ("broker outage holds the replicas", plain(), seen(&plain(), BrokerView::Failed("BrokerUnreachable", "refused".into()), Some(at_3.clone()), unknown.clone()),
                Want { written: None, desired: Some(3), ready: "BrokerNotRead", events: &["BrokerUnreachable"], requeue: Some(2) }),
            ("pause holds at 0 with 12 pending", paused.clone(), seen(&paused, read(12), Some(ours(&paused, 0, 1)), wrote(&ours(&paused, 0, 1), 1)),
                Want { written: None, desired: Some(0), ready: "WorkersReady", events: &["Paused"], requeue: None }),
            ("scale-down waits out its window", plain(), seen(&plain(), read(0), Some(ours(&plain(), 6, 4)), window),
                Want { written: None, desired: Some(6), ready: "WorkersNotReady", events: &[], requeue: Some(2) }),
            ("hand edit of the image is restored", plain(), seen(&plain(), read(12), Some(edited), wrote(&at_3, 4)),
                Want { written: Some(3), desired: Some(3), ready: "WorkersNotReady", events: &["Restored"], requeue: None }),
            ("kubectl scale during an outage is restored", plain(), seen(&plain(), BrokerView::Failed("BrokerUnreachable", "refused".into()), Some(scaled_by_hand), unknown.clone()),
                Want { written: Some(3), desired: Some(3), ready: "BrokerNotRead", events: &["BrokerUnreachable", "Restored"], requeue: Some(2) }),
        ];
        for (name, tq, seen, want) in rows {
            let p = plan(&tq, &seen);
            let written = p.deployment.as_ref().map(|d| d.spec.as_ref().unwrap().replicas.unwrap());
            assert_eq!(written, want.written, "{name}: written");
            assert_eq!(p.status.desired_replicas, want.desired, "{name}: desiredReplicas");
            let ready = p.status.conditions.iter().find(|c| c.type_ == READY).unwrap();
            assert_eq!(ready.reason, want.ready, "{name}: Ready {ready:?}");
            let events: Vec<&str> = p.events.iter().map(|e| e.reason).collect();
            assert_eq!(events, want.events, "{name}: events");
            assert_eq!(p.requeue, want.requeue.map(Duration::from_secs), "{name}: requeue");
            // The whole status comes from this one place: every condition type is there.
            let types: Vec<&str> = p.status.conditions.iter().map(|c| c.type_.as_str()).collect();
            assert!(
                types.contains(&SPEC_VALID) && types.contains(&READY) && types.contains(&ROUTES_ACCEPTED),
                "{name}: {types:?}"
            );
            assert_eq!(p.status.observed_generation, Some(2), "{name}");
            assert_eq!(
                p.repair.is_some(),
                name.starts_with("hand edit"),
                "{name}: the worker container is put back whole"
            );
        }
    }

    /// `plain()` reading `queue` shared with `other`, both on it as spec.queue with equal capacity.
    fn shared_read(pending: i64) -> BrokerView {
        let depth = crate::broker::QueueDepth { pending, ..Default::default() };
        let both = vec![
            Consumer { name: "ai".into(), primary: true, weight: 40 },
            Consumer { name: "ai-big".into(), primary: true, weight: 40 },
        ];
        let share = Share::among(both, "ai");
        BrokerView::Read {
            queues: vec![QueueReading { queue: "ai_processing".into(), depth, share }],
            message: "read".into(),
        }
    }

    #[test]
    fn a_shared_queue_is_counted_once_said_once_and_explained() {
        let tq = plain();
        let at_1 = ours(&tq, 1, 2);
        let first = plan(&tq, &seen(&tq, shared_read(16), Some(at_1.clone()), wrote(&at_1, 2)));
        // 16 pending, half of it ours: ceil(8 / 4) = 2, not ceil(16 / 4) = 4.
        assert_eq!(first.status.desired_replicas, Some(2));
        assert_eq!((first.status.pending, first.status.pending_by_queue["ai_processing"]), (Some(8), 16));
        let shared = find(&first.status.conditions, QUEUE_SHARED).unwrap();
        assert_eq!((shared.status.as_str(), shared.reason.as_str()), ("True", "DemandSplit"));
        assert_eq!(
            shared.message,
            "queue ai_processing is also consumed by ai-big (spec.queue): this pool counts 40/80 of its demand (split \
             by maxReplicas × tasksPerReplica)"
        );
        assert_eq!(first.events.iter().map(|e| e.reason).collect::<Vec<_>>(), ["QueueShared", "ScaledUp"]);
        let reason = first.status.last_scale_reason.as_deref().unwrap();
        assert!(
            reason.ends_with(
                "queue ai_processing shared with ai-big (spec.queue): counts 8 of 16 pending and 0 of 0 in \
                 flight (share 40/80)"
            ),
            "{reason}"
        );
        // Said once: not again from memory, nor after a restart (from the stored condition).
        let mut stored = tq.clone();
        stored.status = Some(first.status.clone());
        let at_2 = ours(&tq, 2, 3);
        let after_write = Memory { applied: wrote(&at_2, 3).applied, ..first.memory.clone() };
        let again = plan(&stored, &seen(&stored, shared_read(16), Some(at_2.clone()), after_write.clone()));
        assert!(again.events.is_empty(), "{:?}", again.events);
        let restarted = plan(&stored, &seen(&stored, shared_read(16), Some(at_2.clone()), Memory::default()));
        assert!(restarted.events.iter().all(|e| e.reason != "QueueShared"), "{:?}", restarted.events);
        // Alone again: the condition says so; an outage keeps what was known.
        let alone = plan(&stored, &seen(&stored, read(16), Some(at_2.clone()), after_write.clone()));
        assert_eq!(find(&alone.status.conditions, QUEUE_SHARED).unwrap().reason, "NotShared");
        let down = BrokerView::Failed("BrokerUnreachable", "refused".into());
        let outage = plan(&stored, &seen(&stored, down, Some(at_2), after_write));
        assert_eq!(find(&outage.status.conditions, QUEUE_SHARED).unwrap().reason, "DemandSplit");
    }

    #[test]
    fn scheduled_tasks_are_reported_and_decided_again_when_they_come_due() {
        let tq = plain(); // etaHorizon 30s by default
        let now_ms = 1_000_000_000;
        // 20 tasks held for an hour, 2 due in 40 s, 1 prefetched without an ETA.
        let mut etas = vec![now_ms + 3_600_000; 20];
        etas.extend([now_ms + 40_000; 2]);
        etas.sort_unstable();
        let depth = crate::broker::QueueDepth { pending: 0, in_flight: 23, etas, ..Default::default() };
        let share = Share::alone(Consumer { name: "ai".into(), primary: true, weight: 40 });
        let view = BrokerView::Read {
            queues: vec![QueueReading { queue: "ai_processing".into(), depth, share }],
            message: "read".into(),
        };
        let at_1 = ours(&tq, 1, 2);
        let p = plan(&tq, &seen(&tq, view, Some(at_1.clone()), wrote(&at_1, 2)));
        assert_eq!((p.status.in_flight, p.status.scheduled), (Some(1), Some(22)));
        assert_eq!(p.status.desired_replicas, Some(1), "ceil(1 / 4), not ceil(23 / 4)");
        // The two due in 40 s come within the 30 s horizon in 10 s: look again then.
        assert_eq!(p.requeue, Some(Duration::from_secs(11)));
    }

    #[test]
    fn orphans_and_unlisted_messages_are_said() {
        let tq = plain();
        let depth = crate::broker::QueueDepth { pending: 0, orphaned: 6, unlisted: 250, ..Default::default() };
        let share = Share::alone(Consumer { name: "ai".into(), primary: true, weight: 40 });
        let view = BrokerView::Read {
            queues: vec![QueueReading { queue: "ai_processing".into(), depth, share }],
            message: "read".into(),
        };
        let at_3 = ours(&tq, 3, 3);
        let p = plan(&tq, &seen(&tq, view, Some(at_3.clone()), wrote(&at_3, 3)));
        assert_eq!((p.status.in_flight, p.status.orphaned), (Some(0), Some(6)));
        let reachable = find(&p.status.conditions, BROKER_REACHABLE).unwrap();
        assert_eq!((reachable.status.as_str(), reachable.reason.as_str()), ("True", "ReadPartly"));
        assert_eq!(
            reachable.message,
            "read; 250 held messages beyond the 100000 unacked tags a poll lists are not counted"
        );
        assert_eq!(plan(&tq, &seen(&tq, read(0), None, Memory::default())).status.orphaned, Some(0));
    }

    #[test]
    fn an_announced_problem_is_not_announced_again() {
        let tq = plain();
        let first =
            plan(&tq, &seen(&tq, BrokerView::Failed("BrokerUnreachable", "refused".into()), None, Memory::default()));
        assert_eq!(first.events.iter().map(|e| e.reason).collect::<Vec<_>>(), ["BrokerUnreachable", "Created"]);
        let mut again = tq.clone();
        again.status = Some(first.status.clone());
        let cause_changed = BrokerView::Failed("BrokerUnreachable", "broken pipe".into());
        let second = plan(&again, &seen(&again, cause_changed, Some(ours(&tq, 0, 1)), first.memory.clone()));
        assert!(second.events.is_empty(), "same reason, other cause text: no new event: {:?}", second.events);
        let back = plan(&again, &seen(&again, read(0), Some(ours(&tq, 0, 1)), second.memory));
        assert_eq!(back.events.iter().map(|e| e.reason).collect::<Vec<_>>(), ["BrokerReachable"]);
    }

    #[test]
    fn a_long_outage_with_fallback_writes_the_status_once() {
        let tq = taskqueue(json!({}), json!({"maxReplicas": 10, "fallbackReplicas": 2, "fallbackAfter": "10s"}));
        let d = ours(&tq, 5, 4);
        let memory = Memory { unknown_since: Some(t0()), ..wrote(&d, 4) };
        let failed = || BrokerView::Failed("BrokerUnreachable", "refused".into());
        let first = plan(&tq, &seen(&tq, failed(), Some(d.clone()), memory));
        assert_eq!(first.deployment.as_ref().and_then(|d| d.spec.as_ref()?.replicas), Some(2));
        let mut stored = tq.clone();
        stored.status = Some(first.status.clone());
        let d2 = ours(&tq, 2, 5);
        let mut memory = first.memory.clone();
        memory.applied = wrote(&d2, 5).applied;
        // The same status however long the outage lasts.
        let at = |secs: u64| Seen {
            instant: t0() + Duration::from_secs(secs),
            ..seen(&stored, failed(), Some(d2.clone()), memory.clone())
        };
        let steady = plan(&stored, &at(200)).status;
        for later in [3_000, 80_000] {
            let p = plan(&stored, &at(later));
            assert!(p.deployment.is_none() && p.events.is_empty(), "{later}s");
            assert_eq!(p.status, steady, "{later}s into the outage: the status is unchanged (no write)");
        }
    }
}
