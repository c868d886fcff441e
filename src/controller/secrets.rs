//! Broker URLs and CA bundles from Secrets, read with `get` only (no list/watch on Secrets) and
//! cached so a steady state does not read a Secret per reconcile. Without a watch nothing says
//! when a Secret changes: [`SecretCache::refresh`] reads each Secret in use again once its copy
//! is older than the TTL (one GET per Secret, however many TaskQueues use it) and names the
//! ones that changed, so their TaskQueues are reconciled; it also drops Secrets nobody uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::{CaSecretRef, SecretKeyRef};

type SecretKey = (String, SecretKeyRef);

/// Secrets read at once by a refresh.
const REFRESH_AT_ONCE: usize = 8;

pub struct SecretCache {
    client: Client,
    ttl: Duration,
    /// (namespace, key) -> (read at, value).
    cache: Mutex<HashMap<SecretKey, (Instant, Vec<u8>)>>,
}

impl SecretCache {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, ttl, cache: Mutex::default() }
    }

    /// The broker URL, or a message that says what to fix (never the URL itself). A cached value
    /// read before `fresh_after` is read again (the broker rejected what it says).
    pub async fn url(&self, ns: &str, r: &SecretKeyRef, fresh_after: Option<Instant>) -> Result<String, String> {
        const FIELD: &str = "spec.broker.urlSecretRef";
        let bytes = self.bytes(ns, r, "the Celery broker URL", FIELD, fresh_after).await?;
        String::from_utf8(bytes).map_err(|_| {
            format!("Secret {ns}/{} key {:?} ({FIELD}) is not UTF-8 text; put the broker URL there", r.name, r.key)
        })
    }

    /// The CA bundle named by `spec.broker.caSecretRef`.
    pub async fn ca(&self, ns: &str, r: &CaSecretRef, fresh_after: Option<Instant>) -> Result<Vec<u8>, String> {
        let r = SecretKeyRef { name: r.name.clone(), key: r.key.clone() };
        let what = "the PEM CA bundle of the broker";
        self.bytes(ns, &r, what, "spec.broker.caSecretRef", fresh_after).await
    }

    /// The value under `r`; errors name the spec field (`field`) that points at it.
    async fn bytes(
        &self,
        ns: &str,
        r: &SecretKeyRef,
        what: &str,
        field: &str,
        fresh_after: Option<Instant>,
    ) -> Result<Vec<u8>, String> {
        let k = (ns.to_string(), r.clone());
        if let Some((at, v)) = self.cache.lock().expect("lock").get(&k) {
            if at.elapsed() < self.ttl && fresh_after.is_none_or(|f| *at >= f) {
                return Ok(v.clone());
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let secret = match api.get_opt(&r.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(format!(
                    "Secret {ns}/{} ({field}.name) not found; create it with {what} under key {:?}",
                    r.name, r.key
                ))
            }
            Err(e) => return Err(format!("cannot read Secret {ns}/{} ({field}.name): {e}", r.name)),
        };
        let bytes = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone());
        let Some(bytes) = bytes else {
            return Err(format!("Secret {ns}/{} has no key {:?}; put {what} there or fix {field}.key", r.name, r.key));
        };
        self.cache.lock().expect("lock").insert(k, (Instant::now(), bytes.clone()));
        Ok(bytes)
    }

    /// Drop the Secrets not in `in_use` ((namespace, name)); read again those older than the
    /// TTL. Returns the Secrets whose cached value changed or went (their TaskQueues must look
    /// again). A Secret that cannot be read now is kept as it was and tried next time.
    pub async fn refresh(&self, in_use: &HashSet<(String, String)>) -> Vec<(String, String)> {
        let stale: BTreeMap<(String, String), Vec<SecretKeyRef>> = {
            let mut cache = self.cache.lock().expect("lock");
            cache.retain(|(ns, r), _| in_use.contains(&(ns.clone(), r.name.clone())));
            let mut stale: BTreeMap<(String, String), Vec<SecretKeyRef>> = BTreeMap::new();
            for ((ns, r), (at, _)) in cache.iter() {
                if at.elapsed() >= self.ttl {
                    stale.entry((ns.clone(), r.name.clone())).or_default().push(r.clone());
                }
            }
            stale
        };
        // Several GETs at a time: a thousand namespaces' Secrets must not take a second each.
        let fetched: Vec<_> = futures::stream::iter(stale)
            .map(|((ns, name), refs)| async move {
                let got = Api::<Secret>::namespaced(self.client.clone(), &ns).get_opt(&name).await;
                (ns, name, refs, got)
            })
            .buffer_unordered(REFRESH_AT_ONCE)
            .collect()
            .await;
        let mut changed = Vec::new();
        for (ns, name, refs, got) in fetched {
            let data = match got {
                Ok(secret) => secret.and_then(|s| s.data).unwrap_or_default(),
                Err(_) => continue,
            };
            let mut cache = self.cache.lock().expect("lock");
            let mut moved = false;
            for r in refs {
                let k = (ns.clone(), r);
                match (data.get(&k.1.key), cache.get_mut(&k)) {
                    (Some(new), Some((at, old))) if new.0 == *old => *at = Instant::now(),
                    _ => {
                        cache.remove(&k);
                        moved = true;
                    }
                }
            }
            if moved {
                changed.push((ns, name));
            }
        }
        changed
    }

    pub fn len(&self) -> usize {
        self.cache.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
