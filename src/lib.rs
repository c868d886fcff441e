//! taskqueue-operator: Celery worker pools per queue on Kubernetes, scaled from the Redis broker.

pub mod broker;
pub mod controller;
pub mod crd;
pub mod demand;
pub mod http;
pub mod manifests;
pub mod metrics;
pub mod quantity;
pub mod routing;
pub mod scaling;
pub mod validate;
