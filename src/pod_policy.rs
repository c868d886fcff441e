//! What a TaskQueue's `podTemplate` may ask of the cluster (pure).
//!
//! The operator writes the worker Deployments with its own rights: where tenants may create
//! TaskQueues but not Deployments, whatever a podTemplate says would otherwise run. By default a
//! template may not make a container privileged, share the node's namespaces, mount host paths,
//! run as root or name a ServiceAccount; the platform allows each with `run --pod-policy-allow`
//! (the chart's `podPolicy` values). What the image itself runs as is not seen here (Pod
//! Security Admission checks the pods).

use std::fmt;

use serde_json::Value;

/// Each flag: the podTemplate may do it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub privileged: bool,
    pub host_namespaces: bool,
    pub host_path: bool,
    pub run_as_root: bool,
    pub service_account: bool,
}

/// The words of `--pod-policy-allow`, the chart value each comes from, and what it allows.
const KINDS: [(&str, &str); 5] = [
    ("privileged", "podPolicy.allowPrivileged"),
    ("host-namespaces", "podPolicy.allowHostNamespaces"),
    ("host-path", "podPolicy.allowHostPath"),
    ("run-as-root", "podPolicy.allowRunAsRoot"),
    ("service-account", "podPolicy.allowServiceAccount"),
];

impl PodPolicy {
    /// Everything allowed (the behaviour before the policy existed).
    pub const ALLOW_ALL: PodPolicy = PodPolicy {
        privileged: true,
        host_namespaces: true,
        host_path: true,
        run_as_root: true,
        service_account: true,
    };

    /// `privileged,host-path` (or empty): the kinds allowed.
    pub fn parse_allow(list: &str) -> Result<Self, String> {
        let mut p = PodPolicy::default();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let Some(flag) = p.flag(word) else {
                let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
                return Err(format!("{word:?} is not a pod policy kind; use {}", known.join(", ")));
            };
            *flag = true;
        }
        Ok(p)
    }

    /// The flag of a `--pod-policy-allow` word.
    fn flag(&mut self, kind: &str) -> Option<&mut bool> {
        match kind {
            "privileged" => Some(&mut self.privileged),
            "host-namespaces" => Some(&mut self.host_namespaces),
            "host-path" => Some(&mut self.host_path),
            "run-as-root" => Some(&mut self.run_as_root),
            "service-account" => Some(&mut self.service_account),
            _ => None,
        }
    }

    fn allows(&self, kind: &str) -> bool {
        let mut copy = *self;
        copy.flag(kind).is_some_and(|f| *f)
    }
}

impl fmt::Display for PodPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allowed: Vec<&str> = KINDS.iter().map(|(k, _)| *k).filter(|k| self.allows(k)).collect();
        f.write_str(if allowed.is_empty() { "nothing".to_string() } else { allowed.join(",") }.as_str())
    }
}

/// `(field, message)` for each thing `template` (a partial PodTemplateSpec, as JSON) asks that
/// `policy` does not allow.
pub fn refused(template: &Value, policy: &PodPolicy) -> Vec<(String, String)> {
    const F: &str = "spec.worker.podTemplate.spec";
    let mut found: Vec<(&str, String, &str)> = Vec::new();
    let spec = template.get("spec").unwrap_or(&Value::Null);
    let is_true = |v: Option<&Value>| v.and_then(Value::as_bool) == Some(true);
    let root = |sc: &Value, at: String, found: &mut Vec<(&str, String, &str)>| {
        if sc.get("runAsUser").and_then(Value::as_i64) == Some(0) {
            found.push(("run-as-root", format!("{at}.runAsUser"), "runs as root (uid 0)"));
        }
        if sc.get("runAsNonRoot").and_then(Value::as_bool) == Some(false) {
            found.push(("run-as-root", format!("{at}.runAsNonRoot"), "lets the container run as root"));
        }
    };

    for key in ["hostPID", "hostIPC"] {
        if is_true(spec.get(key)) {
            found.push(("host-namespaces", format!("{F}.{key}"), "shares a namespace of the node"));
        }
    }
    for key in ["serviceAccountName", "serviceAccount"] {
        if spec.get(key).and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
            found.push(("service-account", format!("{F}.{key}"), "runs the workers with another ServiceAccount"));
        }
    }
    if let Some(sc) = spec.get("securityContext") {
        root(sc, format!("{F}.securityContext"), &mut found);
    }
    for (i, v) in spec.get("volumes").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if v.get("hostPath").is_some_and(|h| !h.is_null()) {
            found.push(("host-path", format!("{F}.volumes[{i}].hostPath"), "mounts a path of the node"));
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for (i, c) in spec.get(list).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("{F}.{list}[{i}]");
            for (j, p) in c.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                if p.get("hostPort").and_then(Value::as_i64).is_some_and(|n| n != 0) {
                    found.push(("host-namespaces", format!("{at}.ports[{j}].hostPort"), "opens a port on the node"));
                }
            }
            let Some(sc) = c.get("securityContext") else { continue };
            let at = format!("{at}.securityContext");
            if is_true(sc.get("privileged")) {
                found.push(("privileged", format!("{at}.privileged"), "makes the container privileged"));
            }
            if is_true(sc.get("allowPrivilegeEscalation")) {
                found.push(("privileged", format!("{at}.allowPrivilegeEscalation"), "lets a process gain privileges"));
            }
            if sc.get("procMount").and_then(Value::as_str) == Some("Unmasked") {
                found.push(("privileged", format!("{at}.procMount"), "unmasks /proc"));
            }
            let added = sc.pointer("/capabilities/add").and_then(Value::as_array).into_iter().flatten();
            for (j, cap) in added.enumerate() {
                if cap.as_str() != Some("NET_BIND_SERVICE") {
                    found.push(("privileged", format!("{at}.capabilities.add[{j}]"), "adds a capability"));
                }
            }
            root(sc, at, &mut found);
        }
    }
    found
        .into_iter()
        .filter(|(kind, _, _)| !policy.allows(kind))
        .map(|(kind, field, what)| {
            let value = KINDS.iter().find(|(k, _)| *k == kind).map_or("", |(_, v)| v);
            let message = format!(
                "{what}, which the operator's pod policy refuses; remove it, or have the platform team allow it \
                 (chart value {value}: true, `run --pod-policy-allow={kind}`)"
            );
            (field, message)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn everything() -> Value {
        json!({"spec": {
            "hostPID": true, "hostIPC": true, "serviceAccountName": "admin",
            "securityContext": {"runAsUser": 0},
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}, {"name": "root", "hostPath": {"path": "/"}}],
            "containers": [
                {"name": "worker", "securityContext": {"privileged": true, "runAsNonRoot": false,
                    "capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"]}}},
                {"name": "side", "ports": [{"containerPort": 80, "hostPort": 80}],
                    "securityContext": {"allowPrivilegeEscalation": true, "procMount": "Unmasked"}}
            ],
            "initContainers": [{"name": "init", "securityContext": {"runAsUser": 0}}]
        }})
    }

    #[test]
    fn by_default_each_way_around_the_namespace_is_refused_naming_its_field() {
        let fields: Vec<String> = refused(&everything(), &PodPolicy::default()).into_iter().map(|(f, _)| f).collect();
        let p = "spec.worker.podTemplate.spec";
        assert_eq!(
            fields,
            [
                format!("{p}.hostPID"),
                format!("{p}.hostIPC"),
                format!("{p}.serviceAccountName"),
                format!("{p}.securityContext.runAsUser"),
                format!("{p}.volumes[1].hostPath"),
                format!("{p}.containers[0].securityContext.privileged"),
                format!("{p}.containers[0].securityContext.capabilities.add[1]"),
                format!("{p}.containers[0].securityContext.runAsNonRoot"),
                format!("{p}.containers[1].ports[0].hostPort"),
                format!("{p}.containers[1].securityContext.allowPrivilegeEscalation"),
                format!("{p}.containers[1].securityContext.procMount"),
                format!("{p}.initContainers[0].securityContext.runAsUser"),
            ]
        );
        let (_, message) = &refused(&everything(), &PodPolicy::default())[0];
        assert!(
            message.contains("podPolicy.allowHostNamespaces") && message.contains("--pod-policy-allow=host-namespaces")
        );
    }

    #[test]
    fn each_kind_is_allowed_on_its_own() {
        let all = refused(&everything(), &PodPolicy::default()).len();
        for (kind, n) in
            [("privileged", 4), ("host-namespaces", 3), ("host-path", 1), ("run-as-root", 3), ("service-account", 1)]
        {
            let policy = PodPolicy::parse_allow(kind).unwrap();
            assert_eq!(refused(&everything(), &policy).len(), all - n, "{kind}");
        }
        assert!(refused(&everything(), &PodPolicy::ALLOW_ALL).is_empty());
        assert_eq!(PodPolicy::parse_allow(" privileged, host-path ").unwrap().to_string(), "privileged,host-path");
        assert_eq!(PodPolicy::default().to_string(), "nothing");
        assert!(PodPolicy::parse_allow("root").unwrap_err().contains("run-as-root"));
    }

    #[test]
    fn ordinary_templates_pass() {
        let t = json!({"spec": {
            "hostPID": false, "securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
            "containers": [{"name": "worker", "securityContext": {"allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}]
        }});
        assert!(refused(&t, &PodPolicy::default()).is_empty());
    }
}
