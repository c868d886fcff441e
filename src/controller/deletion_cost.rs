//! Which pods a scale-in should remove first (pure).
//!
//! A ReplicaSet that scales in deletes pods with the lowest
//! `controller.kubernetes.io/pod-deletion-cost` first (after unscheduled, pending and unready
//! pods; Kubernetes >= 1.22, or 1.21 with the PodDeletionCost feature gate). Right before a
//! scale-in the operator sets each pod's cost to the number of tasks its worker is running, as
//! reported by the worker's last heartbeat, so idle workers go first and busy ones keep their
//! work. A pod whose worker is not heard from (starting, or gone) counts as idle.

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::deployment::controller_uid;

pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The pods of `pods` that a ReplicaSet of the Deployment with uid `deployment` controls. Labels
/// alone would also take another chart's pods that happen to carry the worker labels.
pub fn owned_pods(pods: Vec<Pod>, replicasets: &[ReplicaSet], deployment: &str) -> Vec<Pod> {
    let ours: Vec<&str> = replicasets
        .iter()
        .filter(|rs| controller_uid(*rs) == Some(deployment))
        .filter_map(|rs| rs.metadata.uid.as_deref())
        .collect();
    pods.into_iter().filter(|p| controller_uid(p).is_some_and(|uid| ours.contains(&uid))).collect()
}

/// `(pod name, cost)` for every live pod whose annotation must change.
pub fn plan(pods: &[Pod], node_name: &str, active: impl Fn(&str) -> Option<i64>) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let name = p.name_any();
            // Our worker command names each worker `<nodeName>@%h`, and %h is the pod's hostname.
            let cost = active(&format!("{node_name}@{name}")).unwrap_or(0).clamp(0, i64::from(i32::MAX));
            let cost = cost.to_string();
            (p.annotations().get(DELETION_COST) != Some(&cost)).then_some((name, cost))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cost: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        if let Some(c) = cost {
            p.metadata.annotations = Some([(DELETION_COST.to_string(), c.to_string())].into());
        }
        p
    }

    #[test]
    fn busy_workers_cost_their_running_tasks_and_idle_ones_nothing() {
        let pods = [pod("w-a", None), pod("w-b", None), pod("w-c", Some("0")), pod("w-d", Some("5"))];
        let active = |h: &str| match h {
            "demo@w-a" => Some(3),
            "demo@w-b" => Some(0),
            "demo@w-d" => Some(1),
            _ => None, // w-c: no heartbeat
        };
        let plan = plan(&pods, "demo", active);
        let want = [("w-a", "3"), ("w-b", "0"), ("w-d", "1")];
        assert_eq!(plan, want.map(|(p, c)| (p.to_string(), c.to_string())), "w-c already carries 0");
    }

    #[test]
    fn only_pods_of_the_deployments_own_replicasets_count() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let owner = |uid: &str, controller: bool| OwnerReference {
            uid: uid.into(),
            controller: Some(controller),
            ..OwnerReference::default()
        };
        let rs = |uid: &str, deployment: &str| {
            let mut r = ReplicaSet::default();
            r.metadata.uid = Some(uid.into());
            r.metadata.owner_references = Some(vec![owner(deployment, true)]);
            r
        };
        let owned = |name: &str, refs: Vec<OwnerReference>| {
            let mut p = pod(name, None);
            p.metadata.owner_references = Some(refs);
            p
        };
        let pods = vec![
            owned("ours-old", vec![owner("rs-1", true)]),
            owned("ours-new", vec![owner("rs-2", true)]),
            owned("other-chart", vec![owner("rs-9", true)]),
            owned("not-controller", vec![owner("rs-1", false)]),
            pod("bare", None),
        ];
        let sets = [rs("rs-1", "dep-uid"), rs("rs-2", "dep-uid"), rs("rs-9", "someone-else")];
        let names: Vec<String> = owned_pods(pods, &sets, "dep-uid").iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["ours-old", "ours-new"]);
    }

    #[test]
    fn terminating_pods_are_left_alone() {
        let mut p = pod("w-a", None);
        p.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::from_second(1).unwrap()));
        assert!(plan(&[p], "demo", |_| Some(2)).is_empty());
    }
}
