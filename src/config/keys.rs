//! The catalogue of valid dotted keys, read off the JSON schema of `ExperimentFile` so it can
//! never drift from the types, and "did you mean" suggestions.

use std::sync::OnceLock;

use serde_json::Value;

use super::file::ExperimentFile;

/// Every leaf key (`train.batch_size`, `sweep.grid`, ...), in schema order.
pub fn leaf_keys() -> &'static [String] {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let schema = serde_json::to_value(schemars::schema_for!(ExperimentFile)).expect("schema");
        let mut out = Vec::new();
        collect(&schema, &schema, "", &mut out);
        out
    })
}

/// True when `key` names a section (a table), such as `train`.
pub fn is_section(key: &str) -> bool {
    let prefix = format!("{key}.");
    leaf_keys().iter().any(|k| k.starts_with(&prefix))
}

pub fn is_leaf(key: &str) -> bool {
    leaf_keys().iter().any(|k| k == key)
}

/// Keys a sweep may vary: every leaf but the file plumbing.
pub fn is_sweepable(key: &str) -> bool {
    is_leaf(key) && key != "extends" && !key.starts_with("sweep.") && !key.starts_with("launcher.")
}

fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return &root["$defs"][name];
    }
    if let Some(any) = node.get("anyOf").and_then(Value::as_array)
        && let Some(inner) = any.iter().find(|n| n.get("$ref").is_some())
    {
        return resolve(root, inner);
    }
    node
}

fn collect(root: &Value, node: &Value, prefix: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    match node.get("properties").and_then(Value::as_object) {
        Some(props) => {
            for (name, child) in props {
                let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                collect(root, child, &key, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

/// The closest valid key to `wrong` (a dotted key), looking first among its siblings, then at
/// every key (a key written in the wrong section).
pub fn suggest(wrong: &str) -> Option<String> {
    let (parent, last) = match wrong.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, wrong),
    };
    let mut candidates: Vec<String> = leaf_keys().to_vec();
    for k in leaf_keys() {
        if let Some((section, _)) = k.split_once('.')
            && !candidates.iter().any(|c| c == section)
        {
            candidates.push(section.to_string());
        }
    }
    let sibling_of = |k: &str| match k.rsplit_once('.') {
        Some((p, _)) => Some(p) == parent,
        None => parent.is_none(),
    };
    let last_of = |k: &str| k.rsplit_once('.').map_or(k, |(_, l)| l).to_string();
    let score = |a: &str, b: &str| strsim::jaro_winkler(a, b);
    let best_sibling = candidates
        .iter()
        .filter(|k| sibling_of(k))
        .map(|k| (score(&last_of(k), last), k))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((s, k)) = best_sibling
        && s >= 0.8
    {
        return Some(k.clone());
    }
    // Same name in another section (`batch_size` at top level -> `train.batch_size`).
    let elsewhere =
        candidates.iter().map(|k| (score(&last_of(k), last), k)).max_by(|a, b| a.0.total_cmp(&b.0));
    match elsewhere {
        Some((s, k)) if s >= 0.85 => Some(k.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_has_every_section() {
        for key in [
            "name",
            "seed",
            "extends",
            "model.hidden_size",
            "model.intermediate_size",
            "model.norm_topk_prob",
            "data.packing",
            "train.max_steps",
            "train.threads",
            "checkpoint.resume",
            "checkpoint.from_weight",
            "sweep.grid",
            "sweep.zip",
        ] {
            assert!(is_leaf(key), "{key} missing from {:?}", leaf_keys());
        }
        assert!(is_section("train"));
        assert!(!is_section("train.batch_size"));
        assert!(!is_leaf("sweep.grid.train"));
    }

    #[test]
    fn suggestions() {
        let table = [
            ("train.batch_sise", Some("train.batch_size")),
            ("train.learning_rat", Some("train.learning_rate")),
            ("model.use_moes", Some("model.use_moe")),
            ("batch_size", Some("train.batch_size")),
            ("trian", Some("train")),
            ("train.zzzzzz", None),
        ];
        for (wrong, want) in table {
            assert_eq!(suggest(wrong).as_deref(), want, "{wrong}");
        }
    }
}
