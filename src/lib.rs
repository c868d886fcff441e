//! taskqueue-operator: Celery worker pools per queue on Kubernetes, scaled from the Redis broker.

pub mod broker;
pub mod celery_args;
pub mod controller;
pub mod crd;
pub mod dashboard;
pub mod demand;
pub mod http;
pub mod install_check;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod pod_policy;
pub mod quantity;
pub mod report;
pub mod routing;
pub mod scaling;
pub mod throughput;
pub mod timeline;
pub mod validate;
pub mod wait_target;

/// A deterministic xorshift generator for the property tests: the same cases every run.
#[cfg(test)]
pub(crate) fn xorshift(seed: u64) -> impl FnMut(u64) -> i64 {
    let mut x = seed;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n) as i64
    }
}
