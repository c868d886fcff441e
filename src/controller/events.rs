//! Kubernetes Events (`events.k8s.io/v1`), one Event per call.
//!
//! kube's `Recorder` folds events with the same reason into one Event series and keeps only the
//! first note: every scale reason after the first (within its 6-minute cache) would be lost. The
//! reconciler already decides itself when something is worth an event (once per transition), so
//! each call here creates its own Event.

use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::runtime::events::EventType;
use kube::{Api, Client};

/// The API server rejects Event notes longer than this (bytes).
const MAX_NOTE: usize = 1024;

pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    seq: AtomicU64,
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        let instance = instance.unwrap_or_else(|| controller.to_string());
        Self { client, controller: controller.into(), instance, seq: AtomicU64::new(0) }
    }

    pub async fn publish(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = jiff::Timestamp::now();
        let ns = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let object = regarding.name.clone().unwrap_or_else(|| self.controller.clone());
        // Unique per process and call (the nanosecond clock alone can repeat on a coarse clock).
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}{seq:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(match type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(truncate(note, MAX_NOTE).into()),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &ns).create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

/// At most `max` bytes, cut at a character boundary, marked with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_to_what_the_api_server_accepts() {
        assert_eq!(truncate("short", MAX_NOTE), "short");
        let long = "é".repeat(700); // 1400 bytes
        let cut = truncate(&long, MAX_NOTE);
        assert!(cut.len() <= MAX_NOTE && cut.ends_with('…'), "{}", cut.len());
        assert!(cut.starts_with("éé"));
    }
}
