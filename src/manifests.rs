//! TaskQueue manifests from files and directories (multi-document YAML or JSON), for the CLI.

use std::path::{Path, PathBuf};

use crate::crd::TaskQueue;

/// Every TaskQueue in `paths` (directories: their `.yaml`, `.yml` and `.json` files, sorted).
/// Other kinds (Secrets, ...) are skipped; a malformed TaskQueue is an error naming file and
/// document.
pub fn load(paths: &[PathBuf]) -> Result<Vec<TaskQueue>, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for f in files {
        out.extend(load_file(&f)?);
    }
    Ok(out)
}

fn load_file(path: &Path) -> Result<Vec<TaskQueue>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("{} document {}: not YAML: {e}", path.display(), i + 1))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("TaskQueue") {
            continue;
        }
        let tq = serde_json::from_value(value)
            .map_err(|e| format!("{} document {}: not a valid TaskQueue: {e}", path.display(), i + 1))?;
        out.push(tq);
    }
    Ok(out)
}
