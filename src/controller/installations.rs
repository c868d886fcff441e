//! Two installations of the operator that watch the same TaskQueue (pure).
//!
//! Each installation writes TaskQueue status under a field manager of its own
//! (`taskqueue-operator@<lease namespace>/<lease name>`), so the API server records in the
//! object's `managedFields` who wrote it and when. Another installation's entry written after
//! this process started (an entry from before is a previous version of this one, or an
//! installation since removed) and within [`RECENT`] means two installations reconcile the
//! object. The one whose name sorts first goes on and says so in a condition; the others stand
//! back (no Deployment or status write) and say so in an Event: both writing would make the
//! replicas and the status flap between two opinions.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

use crate::crd::MANAGER;

/// Another installation's write older than this is not taken as a live installation: one that
/// was removed stops counting after it (and the one that stood back takes over).
pub const RECENT: Duration = Duration::from_secs(15 * 60);

/// The field manager of this installation's status writes.
pub fn status_manager(lease_namespace: &str, lease_name: &str) -> String {
    let name = format!("{MANAGER}@{lease_namespace}/{lease_name}");
    if name.len() <= 128 {
        return name; // the API server's limit for a field manager
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    format!("{MANAGER}@{:016x}", h.finish())
}

/// Another installation seen writing a TaskQueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Other {
    pub manager: String,
    /// When it last wrote (RFC 3339, as the API server recorded it).
    pub at: String,
}

/// What to do about other installations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Alone,
    /// This installation goes on; these others also write (they stand back).
    First(Vec<Other>),
    /// This one stands back for `0`.
    StandBack(Other),
}

/// Other installations' writes in `entries` since `since` (Unix seconds: the later of this
/// process's start and now − [`RECENT`]).
pub fn verdict(entries: &[ManagedFieldsEntry], mine: &str, since: i64) -> Verdict {
    let mut others: Vec<Other> = entries
        .iter()
        .filter_map(|e| {
            let manager = e.manager.as_deref()?;
            let at = e.time.as_ref()?;
            let ours = manager.starts_with(MANAGER) && manager != mine && manager != MANAGER;
            (ours && at.0.as_second() >= since).then(|| Other { manager: manager.to_string(), at: at.0.to_string() })
        })
        .collect();
    others.sort_by(|a, b| a.manager.cmp(&b.manager));
    match others.first() {
        None => Verdict::Alone,
        Some(first) if first.manager.as_str() < mine => Verdict::StandBack(first.clone()),
        Some(_) => Verdict::First(others),
    }
}

/// Keep of `managedFields` only the operator installations' entries, without their field sets
/// (the cache holds who wrote and when, not what).
pub fn trim(entries: &mut Vec<ManagedFieldsEntry>) {
    entries.retain(|e| e.manager.as_deref().is_some_and(|m| m.starts_with(MANAGER)));
    for e in entries.iter_mut() {
        e.fields_v1 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn entry(manager: &str, at: i64) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            time: Some(Time(jiff::Timestamp::from_second(at).unwrap())),
            operation: Some("Apply".into()),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn the_first_name_goes_on_and_the_others_stand_back() {
        let (a, b) = ("taskqueue-operator@ops/a", "taskqueue-operator@ops/b");
        let both = [entry(a, 1000), entry(b, 1000), entry("kubectl", 1000)];
        assert_eq!(
            verdict(&both, a, 900),
            Verdict::First(vec![Other { manager: b.into(), at: "1970-01-01T00:16:40Z".into() }])
        );
        assert!(matches!(verdict(&both, b, 900), Verdict::StandBack(o) if o.manager == a));
        // Written before this process started (or long ago): not a live installation.
        assert_eq!(verdict(&both, b, 1001), Verdict::Alone);
        // The name of versions before this one is this installation's own past.
        assert_eq!(verdict(&[entry("taskqueue-operator", 1000)], b, 900), Verdict::Alone);
    }

    #[test]
    fn names_fit_the_api_servers_limit() {
        assert_eq!(status_manager("ops", "tq"), "taskqueue-operator@ops/tq");
        let long = status_manager(&"n".repeat(63), &"l".repeat(63));
        assert!(long.len() <= 128 && long.starts_with("taskqueue-operator@"), "{long}");
        let mut entries = vec![entry("kubectl", 1), entry("taskqueue-operator@x/y", 1)];
        entries[1].fields_v1 = Some(Default::default());
        trim(&mut entries);
        assert_eq!((entries.len(), entries[0].fields_v1.is_none()), (1, true));
    }
}
