//! The namespaces the operator watches, as one cache per resource.
//!
//! With several namespaces each has a watch of its own (the operator's Roles exist only there,
//! so a cluster-wide watch would be refused). kube's reflector writer expects one watch: each
//! watch's re-list (`Init` … `InitDone`) would replace the whole store with that namespace's
//! objects. So the watches' events are applied here instead: a namespace's list is kept until it
//! is complete, then applied at once as `Apply`s, and the objects of that namespace it did not
//! list are deleted. Downstream sees only `Apply` and `Delete`. The store is marked ready (the
//! controller waits for that) once every namespace has been listed.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use futures::stream::{self, BoxStream, StreamExt};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};

/// Every namespace (empty list), or these.
pub fn label(namespaces: &[String]) -> String {
    if namespaces.is_empty() {
        "<all>".to_string()
    } else {
        namespaces.join(",")
    }
}

/// The stream of one namespace's watch (`""`: all namespaces).
pub type Watch<K> = (String, BoxStream<'static, Result<Event<K>, watcher::Error>>);

/// Applies several watches' events to one store.
struct Merge<K: Resource<DynamicType = ()> + Clone + 'static, F> {
    writer: Writer<K>,
    /// The objects each namespace's current list has shown so far.
    listing: HashMap<String, Vec<K>>,
    /// Namespaces whose first list is complete.
    listed: HashSet<String>,
    watches: usize,
    /// Called once every namespace has been listed.
    on_listed: Option<F>,
}

impl<K, F> Merge<K, F>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    ObjectRef<K>: Hash + Eq,
    F: FnOnce(),
{
    fn apply(&mut self, ns: String, event: Result<Event<K>, watcher::Error>) -> Vec<Result<Event<K>, watcher::Error>> {
        let event = match event {
            Ok(e) => e,
            Err(e) => return vec![Err(e)],
        };
        let out = match event {
            Event::Init => {
                self.listing.insert(ns, Vec::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                self.listing.entry(ns).or_default().push(obj);
                Vec::new()
            }
            Event::Apply(obj) => vec![Event::Apply(obj)],
            Event::Delete(obj) => vec![Event::Delete(obj)],
            Event::InitDone => {
                let listed = self.listing.remove(&ns).unwrap_or_default();
                let seen: HashSet<ObjectRef<K>> = listed.iter().map(ObjectRef::from_obj).collect();
                let gone = self
                    .writer
                    .as_reader()
                    .state()
                    .into_iter()
                    .filter(|o| ns.is_empty() || o.namespace().as_deref() == Some(ns.as_str()))
                    .filter(|o| !seen.contains(&ObjectRef::from_obj(&**o)))
                    .map(|o| Event::Delete((*o).clone()));
                let out: Vec<Event<K>> = listed.into_iter().map(Event::Apply).chain(gone).collect();
                self.listed.insert(ns);
                out
            }
        };
        for e in &out {
            self.writer.apply_watcher_event(e);
        }
        if self.listed.len() == self.watches {
            if let Some(f) = self.on_listed.take() {
                self.mark_ready();
                f();
            }
        }
        out.into_iter().map(Ok).collect()
    }

    /// The writer marks its store ready only at the end of a list it was given whole: give it
    /// the store's own content as one (an identical swap).
    fn mark_ready(&mut self) {
        let all = self.writer.as_reader().state();
        self.writer.apply_watcher_event(&Event::Init);
        for o in all {
            self.writer.apply_watcher_event(&Event::InitApply((*o).clone()));
        }
        self.writer.apply_watcher_event(&Event::InitDone);
    }
}

/// One stream over `watches` that keeps `writer`'s store; `on_listed` runs once all have listed.
pub fn reflect<K, F>(
    watches: Vec<Watch<K>>,
    writer: Writer<K>,
    on_listed: F,
) -> BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    ObjectRef<K>: Hash + Eq,
    F: FnOnce() + Send + 'static,
{
    let mut merge = Merge {
        writer,
        listing: HashMap::new(),
        listed: HashSet::new(),
        watches: watches.len(),
        on_listed: Some(on_listed),
    };
    let tagged = watches.into_iter().map(|(ns, s)| s.map(move |e| (ns.clone(), e)).boxed());
    stream::select_all(tagged).flat_map(move |(ns, e)| stream::iter(merge.apply(ns, e))).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    fn cm(ns: &str, name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.namespace = Some(ns.into());
        c.metadata.name = Some(name.into());
        c
    }

    fn names(store: &reflector::Store<ConfigMap>) -> Vec<String> {
        let mut v: Vec<String> =
            store.state().iter().map(|c| format!("{}/{}", c.namespace().unwrap(), c.name_any())).collect();
        v.sort();
        v
    }

    /// Every event the merged stream has ready now.
    fn drain(merged: &mut BoxStream<'static, Result<Event<ConfigMap>, watcher::Error>>) -> Vec<String> {
        use futures::FutureExt;
        let mut out = Vec::new();
        while let Some(Some(Ok(e))) = merged.next().now_or_never() {
            out.push(match e {
                Event::Apply(c) => format!("apply {}/{}", c.namespace().unwrap(), c.name_any()),
                Event::Delete(c) => format!("delete {}/{}", c.namespace().unwrap(), c.name_any()),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn each_namespace_relists_only_its_own_objects() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let (store, writer) = reflector::store::<ConfigMap>();
        let listed = std::sync::Arc::new(AtomicBool::new(false));
        let (a_tx, a_rx) = futures::channel::mpsc::unbounded();
        let (b_tx, b_rx) = futures::channel::mpsc::unbounded();
        let flag = listed.clone();
        let mut merged = reflect(vec![("a".into(), a_rx.boxed()), ("b".into(), b_rx.boxed())], writer, move || {
            flag.store(true, SeqCst)
        });
        let send = |tx: &futures::channel::mpsc::UnboundedSender<_>, events: Vec<Event<ConfigMap>>| {
            events.into_iter().for_each(|e| tx.unbounded_send(Ok(e)).unwrap())
        };
        send(&a_tx, vec![Event::Init, Event::InitApply(cm("a", "x")), Event::InitApply(cm("a", "y"))]);
        assert_eq!(drain(&mut merged), Vec::<String>::new(), "a list is applied once complete");
        assert!(names(&store).is_empty());
        send(&a_tx, vec![Event::InitDone]);
        assert_eq!(drain(&mut merged), ["apply a/x", "apply a/y"]);
        assert!(!listed.load(SeqCst), "b is not listed yet");
        {
            use futures::FutureExt;
            assert!(store.wait_until_ready().now_or_never().is_none(), "not ready before every namespace is listed");
        }
        send(&b_tx, vec![Event::Init, Event::InitApply(cm("b", "z")), Event::InitDone]);
        assert_eq!(drain(&mut merged), ["apply b/z"]);
        assert!(listed.load(SeqCst));
        assert_eq!(names(&store), ["a/x", "a/y", "b/z"]);
        use futures::FutureExt;
        assert!(store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok()), "ready once all are listed");
        // a's watch restarts (after a 410) and y went meanwhile: a's y goes, b's z stays.
        send(&a_tx, vec![Event::Init, Event::InitApply(cm("a", "x")), Event::InitDone]);
        assert_eq!(drain(&mut merged), ["apply a/x", "delete a/y"]);
        assert_eq!(names(&store), ["a/x", "b/z"]);
        // One watch over all namespaces: its re-list covers every object.
        let (store, writer) = reflector::store::<ConfigMap>();
        let (all_tx, all_rx) = futures::channel::mpsc::unbounded();
        let mut merged = reflect(vec![(String::new(), all_rx.boxed())], writer, || {});
        send(
            &all_tx,
            vec![Event::Init, Event::InitApply(cm("a", "x")), Event::InitApply(cm("b", "y")), Event::InitDone],
        );
        send(&all_tx, vec![Event::Init, Event::InitApply(cm("b", "y")), Event::InitDone]);
        assert_eq!(drain(&mut merged), ["apply a/x", "apply b/y", "apply b/y", "delete a/x"]);
        assert_eq!(names(&store), ["b/y"]);
    }
}
