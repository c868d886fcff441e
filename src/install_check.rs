//! `taskqueue-operator check`: is an installation up? (The chart's `helm test` runs it.)
//!
//! Up means: the Lease names a holder that renewed it recently, that holder is one of the
//! installation's pods, and that pod is Ready (its `/readyz`: caches filled). Everything is read
//! from the API server, so it needs no Service, DNS or network path to the pods.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

/// A leader that has not renewed for this long is not leading (twice client-go's 15 s lease).
const STALE: Duration = Duration::from_secs(30);

/// The verdict (pure): Ok with a summary, or why the installation is not up.
pub fn verdict(lease: Option<&Lease>, pods: &[Pod], now: jiff::Timestamp) -> Result<String, String> {
    let ready = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let n_ready = pods.iter().filter(|p| ready(p)).count();
    let spec = lease.and_then(|l| l.spec.as_ref()).ok_or("no Lease: no replica has ever led")?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty()).ok_or("the Lease has no holder")?;
    let renewed = spec.renew_time.as_ref().map(|t| t.0).ok_or("the Lease was never renewed")?;
    let age = now.duration_since(renewed).as_secs_f64().max(0.0);
    if age > STALE.as_secs_f64() {
        return Err(format!("the leader {holder} last renewed the Lease {age:.0} s ago"));
    }
    let pod = pods.iter().find(|p| p.metadata.name.as_deref() == Some(holder));
    match pod {
        None => Err(format!("the Lease names {holder}, which is not a pod of this installation")),
        Some(p) if !ready(p) => Err(format!("the leader {holder} is not Ready (its /readyz fails)")),
        Some(_) => Ok(format!(
            "leader {holder} renewed the Lease {age:.0} s ago and is Ready; {n_ready} of {} operator pods Ready",
            pods.len()
        )),
    }
}

/// Read the Lease `namespace/lease` and the pods matching `selector`, then judge.
pub async fn check(namespace: &str, lease: &str, selector: &str) -> Result<String, String> {
    let client = Client::try_default().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let lease = leases.get_opt(lease).await.map_err(|e| format!("reading Lease {namespace}/{lease}: {e}"))?;
    let pods = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| format!("listing the operator's pods ({selector}): {e}"))?
        .items;
    verdict(lease.as_ref(), &pods, jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::json;

    fn lease(holder: &str, renewed: i64) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(jiff::Timestamp::from_second(renewed).unwrap())),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    fn pod(name: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .unwrap()
    }

    #[test]
    fn up_only_with_a_fresh_lease_held_by_a_ready_pod_of_the_installation() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let pods = [pod("op-a", true), pod("op-b", false)];
        let ok = verdict(Some(&lease("op-a", 995)), &pods, now).unwrap();
        assert_eq!(ok, "leader op-a renewed the Lease 5 s ago and is Ready; 1 of 2 operator pods Ready");
        for (l, says) in [
            (None, "no Lease"),
            (Some(lease("", 995)), "no holder"),
            (Some(lease("op-a", 900)), "last renewed the Lease 100 s ago"),
            (Some(lease("elsewhere", 995)), "not a pod of this installation"),
            (Some(lease("op-b", 995)), "op-b is not Ready"),
        ] {
            let e = verdict(l.as_ref(), &pods, now).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
