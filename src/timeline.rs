//! A timeline of worker pools: pending, in-flight and replicas per TaskQueue over time, with
//! each scale change marked, drawn as one SVG (no dependency: a few hundred bytes of markup per
//! series). `taskqueue-operator timeline` records one from the TaskQueues' status while
//! something runs (`make demo PLOT=...` does); the recording and the drawing are pure.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kube::ResourceExt;

use crate::crd::TaskQueue;

/// One look at one pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the recording started.
    pub t: f64,
    pub pending: i64,
    pub in_flight: i64,
    /// `status.desiredReplicas`: what the operator wrote to the Deployment.
    pub replicas: i32,
}

/// A change of replicas, with the operator's reason.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleMark {
    pub t: f64,
    pub from: i32,
    pub to: i32,
    pub reason: String,
}

/// Everything recorded for one TaskQueue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    pub queue: String,
    pub max_replicas: i32,
    pub samples: Vec<Sample>,
    pub marks: Vec<ScaleMark>,
}

/// Pools by TaskQueue name, filled one snapshot at a time.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    pub pools: BTreeMap<String, Pool>,
}

impl Recorder {
    /// Add what the TaskQueues' status says at `t`. A TaskQueue without a decision yet is left
    /// out until it has one.
    pub fn record(&mut self, t: f64, taskqueues: &[TaskQueue]) {
        for tq in taskqueues {
            let Some(st) = &tq.status else { continue };
            let Some(replicas) = st.desired_replicas else { continue };
            let pool = self.pools.entry(tq.name_any()).or_default();
            pool.queue = tq.spec.queue.clone();
            pool.max_replicas = tq.spec.scaling.max_replicas;
            if let Some(prev) = pool.samples.last().filter(|p| p.replicas != replicas) {
                let reason = st.last_scale_reason.clone().unwrap_or_default();
                pool.marks.push(ScaleMark { t, from: prev.replicas, to: replicas, reason });
            }
            let (pending, in_flight) = (st.pending.unwrap_or(0), st.in_flight.unwrap_or(0));
            pool.samples.push(Sample { t, pending, in_flight, replicas });
        }
    }
}

const WIDTH: f64 = 960.0;
const PANEL: f64 = 150.0;
const GAP: f64 = 34.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 56.0;
const TOP: f64 = 56.0;
const PENDING: &str = "#4e79a7";
const IN_FLIGHT: &str = "#f28e2b";
const REPLICAS: &str = "#2f7d32";

/// The whole timeline as an SVG document: one panel per pool, one time axis.
pub fn svg(title: &str, pools: &BTreeMap<String, Pool>) -> String {
    let end = pools.values().flat_map(|p| p.samples.iter().map(|s| s.t)).fold(1.0_f64, f64::max);
    let height = TOP + pools.len().max(1) as f64 * (PANEL + GAP) + 20.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>
"#,
        escape(title)
    );
    legend(&mut out);
    if pools.is_empty() {
        let _ = writeln!(out, r#"<text x="{LEFT}" y="{}">no TaskQueue had a decision</text>"#, TOP + 20.0);
    }
    for (i, (name, pool)) in pools.iter().enumerate() {
        panel(&mut out, name, pool, TOP + i as f64 * (PANEL + GAP), end);
    }
    out.push_str("</svg>\n");
    out
}

fn legend(out: &mut String) {
    let items =
        [(PENDING, "pending (left axis)"), (IN_FLIGHT, "in flight (left axis)"), (REPLICAS, "replicas (right axis)")];
    let mut x = LEFT;
    for (colour, label) in items {
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="38" x2="{}" y2="38" stroke="{colour}" stroke-width="3"/><text x="{}" y="42">{label}</text>"#,
            x + 18.0,
            x + 24.0
        );
        x += 180.0;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{x}" y1="32" x2="{x}" y2="44" stroke="#555" stroke-dasharray="3,2"/><text x="{}" y="42">scale event (↑ up, ↓ down)</text>"##,
        x + 6.0
    );
}

/// One pool: tasks on the left axis, replicas on the right, scale events as dashed lines.
fn panel(out: &mut String, name: &str, pool: &Pool, top: f64, end: f64) {
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (top + PANEL, top + 14.0);
    let tasks_max = nice_ceiling(pool.samples.iter().map(|s| s.pending.max(s.in_flight)).max().unwrap_or(0).max(1));
    let replicas_max = pool.max_replicas.max(pool.samples.iter().map(|s| s.replicas).max().unwrap_or(0)).max(1);
    let x = |t: f64| x0 + (x1 - x0) * t / end;
    let y_tasks = |v: i64| y0 - (y0 - y1) * v as f64 / tasks_max as f64;
    let y_replicas = |v: i32| y0 - (y0 - y1) * f64::from(v) / f64::from(replicas_max);

    let _ = writeln!(
        out,
        r##"<text x="{x0}" y="{}" font-weight="bold">{} <tspan font-weight="normal" fill="#555">queue {}, maxReplicas {}</tspan></text>"##,
        top + 6.0,
        escape(name),
        escape(&pool.queue),
        pool.max_replicas
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
        x1 - x0,
        y0 - y1
    );
    for (v, label_x, anchor, label) in [
        (y_tasks(tasks_max), x0 - 6.0, "end", tasks_max.to_string()),
        (y0, x0 - 6.0, "end", "0".to_string()),
        (y_replicas(replicas_max), x1 + 6.0, "start", replicas_max.to_string()),
        (y0, x1 + 6.0, "start", "0".to_string()),
    ] {
        let _ =
            writeln!(out, r##"<text x="{label_x}" y="{}" text-anchor="{anchor}" fill="#555">{label}</text>"##, v + 4.0);
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555" transform="rotate(-90 {} {})">tasks</text>"##,
        x0 - 40.0,
        (y0 + y1) / 2.0,
        x0 - 40.0,
        (y0 + y1) / 2.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555" transform="rotate(90 {} {})">replicas</text>"##,
        x1 + 36.0,
        (y0 + y1) / 2.0,
        x1 + 36.0,
        (y0 + y1) / 2.0
    );
    time_axis(out, x0, x1, y0, end);

    if !pool.samples.is_empty() {
        let pending: Vec<(f64, f64)> = pool.samples.iter().map(|s| (x(s.t), y_tasks(s.pending))).collect();
        let mut area = format!("M{:.1},{y0:.1}", pending[0].0);
        for (px, py) in &pending {
            let _ = write!(area, " L{px:.1},{py:.1}");
        }
        let _ = write!(area, " L{:.1},{y0:.1} Z", pending[pending.len() - 1].0);
        let _ = writeln!(out, r#"<path d="{area}" fill="{PENDING}" fill-opacity="0.18" stroke="none"/>"#);
        polyline(out, &pending, PENDING, false);
        let in_flight: Vec<(f64, f64)> = pool.samples.iter().map(|s| (x(s.t), y_tasks(s.in_flight))).collect();
        polyline(out, &in_flight, IN_FLIGHT, false);
        let replicas: Vec<(f64, f64)> = pool.samples.iter().map(|s| (x(s.t), y_replicas(s.replicas))).collect();
        polyline(out, &replicas, REPLICAS, true);
    }
    for m in &pool.marks {
        let mx = x(m.t);
        let arrow = if m.to > m.from { "↑" } else { "↓" };
        let _ = writeln!(
            out,
            r##"<g><title>{:.0}s: {} → {} replicas: {}</title><line x1="{mx:.1}" y1="{y1}" x2="{mx:.1}" y2="{y0}" stroke="#555" stroke-dasharray="3,2"/><text x="{:.1}" y="{}" font-size="11" fill="#333">{arrow}{}</text></g>"##,
            m.t,
            m.from,
            m.to,
            escape(&m.reason),
            mx + 2.0,
            y1 + 11.0,
            m.to
        );
    }
}

/// Seconds along the bottom of a panel, at a round step.
fn time_axis(out: &mut String, x0: f64, x1: f64, y: f64, end: f64) {
    let step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
        .into_iter()
        .find(|s| end / s <= 12.0)
        .unwrap_or(7200.0);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        let x = x0 + (x1 - x0) * t / end;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{y}" x2="{x:.1}" y2="{}" stroke="#999"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="10" fill="#555">{t}s</text>"##,
            y + 4.0,
            y + 15.0
        );
        t += step;
    }
}

/// A line through `points`; `steps` holds each value until the next point (replicas change in
/// steps, tasks are sampled).
fn polyline(out: &mut String, points: &[(f64, f64)], colour: &str, steps: bool) {
    let mut d = String::new();
    for (i, (x, y)) in points.iter().enumerate() {
        if i == 0 {
            let _ = write!(d, "M{x:.1},{y:.1}");
        } else if steps {
            let _ = write!(d, " H{x:.1} V{y:.1}");
        } else {
            let _ = write!(d, " L{x:.1},{y:.1}");
        }
    }
    let width = if steps { 2.5 } else { 1.8 };
    let _ = writeln!(out, r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="{width}"/>"#);
}

/// 1, 2, 5, 10, 20, 50, ... at or above `v`.
fn nice_ceiling(v: i64) -> i64 {
    let mut base = 1i64;
    loop {
        for m in [1, 2, 5] {
            if base.saturating_mul(m) >= v {
                return base.saturating_mul(m);
            }
        }
        base = base.saturating_mul(10);
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tq(name: &str, pending: i64, in_flight: i64, replicas: Option<i32>, reason: &str) -> TaskQueue {
        let mut status = json!({"pending": pending, "inFlight": in_flight, "lastScaleReason": reason});
        if let Some(r) = replicas {
            status["desiredReplicas"] = json!(r);
        }
        serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {
                "queue": format!("{name}_q"),
                "broker": {"urlSecretRef": {"name": "b"}},
                "worker": {"image": "i", "app": "a", "concurrency": 2},
                "scaling": {"maxReplicas": 6}
            },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn a_change_of_replicas_is_marked_once_with_the_operators_reason() {
        let mut r = Recorder::default();
        r.record(0.0, &[tq("ai", 0, 0, Some(0), "idle"), tq("new", 0, 0, None, "")]);
        r.record(1.0, &[tq("ai", 12, 0, Some(3), "12 pending / 4 per replica")]);
        r.record(2.0, &[tq("ai", 4, 6, Some(3), "12 pending / 4 per replica")]);
        r.record(3.0, &[tq("ai", 0, 0, Some(1), "window passed")]);
        let ai = &r.pools["ai"];
        assert_eq!(ai.samples.len(), 4);
        assert_eq!(ai.samples[2], Sample { t: 2.0, pending: 4, in_flight: 6, replicas: 3 });
        let marks: Vec<(f64, i32, i32, &str)> =
            ai.marks.iter().map(|m| (m.t, m.from, m.to, m.reason.as_str())).collect();
        assert_eq!(marks, [(1.0, 0, 3, "12 pending / 4 per replica"), (3.0, 3, 1, "window passed")]);
        assert!(!r.pools.contains_key("new"), "no decision yet: not drawn");
        assert_eq!((ai.queue.as_str(), ai.max_replicas), ("ai_q", 6));
    }

    #[test]
    fn the_drawing_is_one_svg_with_a_panel_per_pool_and_every_mark() {
        let mut r = Recorder::default();
        for t in 0..30i32 {
            let pending = if (5..15).contains(&t) { i64::from(40 - 3 * (t - 5)) } else { 0 };
            let replicas = if (5..20).contains(&t) { 4 } else { 0 };
            r.record(
                f64::from(t),
                &[tq("ai", pending, 2, Some(replicas), "why <it> scaled"), tq("mail", 0, 0, Some(1), "")],
            );
        }
        let s = svg("demo & run", &r.pools);
        assert!(s.starts_with("<svg ") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("queue ai_q").count() + s.matches("queue mail_q").count(), 2, "one panel each");
        assert_eq!(s.matches("stroke-dasharray=\"3,2\"").count(), 2 + 1, "two scale events and the legend");
        assert!(s.contains("why &lt;it&gt; scaled") && s.contains("demo &amp; run"), "text is escaped");
        assert!(s.contains(">↑4<") && s.contains(">↓0<"));
        assert!(s.contains(">50<"), "the tasks axis ends at a round number above the peak of 40");
        assert!(svg("empty", &BTreeMap::new()).contains("no TaskQueue had a decision"));
    }

    #[test]
    fn axes_end_at_round_numbers() {
        let got: Vec<i64> = [1, 2, 3, 7, 10, 11, 40, 120, 999].into_iter().map(nice_ceiling).collect();
        assert_eq!(got, [1, 2, 5, 10, 10, 20, 50, 200, 1000]);
    }
}
