//! How a run's config.toml may differ from the config its newest checkpoint was trained with
//! (a resume's `--set`, or a hand edit): keys a resume may change (accepted and recorded as
//! `--set` records them), keys that would change the model or the order of the data (refused,
//! like `--set` refuses them), and keys that only say where and how the run executes.

/// Keys a resume may change: they change neither the model nor the order of the data, so the
/// run stays one run.
pub const RESUMABLE_KEYS: &[&str] = &[
    "train.max_steps",
    "train.epochs",
    "train.threads",
    "train.learning_rate",
    "train.schedule",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.weight_decay",
    "train.grad_clip",
    "checkpoint.log_interval",
    "checkpoint.save_interval",
    "checkpoint.keep_last",
    "checkpoint.eval_interval",
    "checkpoint.eval_batches",
    "data.num_workers",
];

/// Keys that may differ freely: where the run executes and writes, and where its inputs are
/// (their content is checked by the data fingerprints); `model.*` is checked as the shape
/// before the weights are read, `derived.*` follows from the rest.
fn is_free(key: &str) -> bool {
    const KEYS: &[&str] = &[
        "name",
        "checkpoint.save_dir",
        "checkpoint.resume",
        "checkpoint.from_weight",
        "train.device",
        "data.path",
        "data.val_path",
        "data.tokenizer",
    ];
    const SECTIONS: &[&str] = &["launcher.", "metrics.", "model.", "derived."];
    KEYS.contains(&key) || SECTIONS.iter().any(|s| key.starts_with(s))
}

/// One key's value in the checkpoint's config and now (`-` where a side lacks it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub key: String,
    pub then: String,
    pub now: String,
}

/// The keys that differ between `then` (a checkpoint's config) and `now` (config.toml with the
/// resume's `--set` values), both resolved configs as TOML: `(resumable, refused)`, in key
/// order. Pure.
pub fn config_edits(then: &toml::Table, now: &toml::Table) -> (Vec<Edit>, Vec<Edit>) {
    let (then, now) = (flatten(then), flatten(now));
    let mut keys: Vec<&String> = then.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let (mut resumable, mut refused) = (Vec::new(), Vec::new());
    for key in keys {
        let (a, b) = (then.get(key), now.get(key));
        if a == b || is_free(key) {
            continue;
        }
        let show = |v: Option<&toml::Value>| v.map_or("-".to_string(), |v| v.to_string());
        let edit = Edit { key: key.clone(), then: show(a), now: show(b) };
        if RESUMABLE_KEYS.contains(&key.as_str()) { resumable.push(edit) } else { refused.push(edit) }
    }
    (resumable, refused)
}

fn flatten(t: &toml::Table) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeMap<String, toml::Value>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", t, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_are_resumable_refused_or_free() {
        let base: toml::Table = toml::from_str(
            "seed = 42\nname = \"a\"\n[train]\nlearning_rate = 0.001\nbatch_size = 4\ndevice = \"cpu\"\nmax_steps = 10\n[model]\nhidden_size = 32\n[data]\npath = \"x.jsonl\"\npacking = false\n",
        )
        .unwrap();
        let edit = |text: &str| -> (Vec<String>, Vec<String>) {
            let mut now = base.clone();
            let patch: toml::Table = toml::from_str(text).unwrap();
            for (section, v) in patch {
                match (now.get_mut(&section), v) {
                    (Some(toml::Value::Table(t)), toml::Value::Table(p)) => t.extend(p),
                    (_, v) => {
                        now.insert(section, v);
                    }
                }
            }
            let (r, x) = config_edits(&base, &now);
            (r.into_iter().map(|e| e.key).collect(), x.into_iter().map(|e| e.key).collect())
        };
        // (patch, resumable keys, refused keys)
        let table: [(&str, &[&str], &[&str]); 7] = [
            ("", &[], &[]),
            ("[train]\nlearning_rate = 0.003", &["train.learning_rate"], &[]),
            ("[train]\nmax_steps = 20\nbatch_size = 8", &["train.max_steps"], &["train.batch_size"]),
            ("seed = 7", &[], &["seed"]),
            ("[data]\npacking = true\npath = \"y.jsonl\"", &[], &["data.packing"]),
            ("name = \"b\"\n[train]\ndevice = \"cuda\"\n[model]\nhidden_size = 64", &[], &[]),
            ("[train]\nwarmup_steps = 5", &["train.warmup_steps"], &[]),
        ];
        for (patch, resumable, refused) in table {
            let (r, x) = edit(patch);
            assert_eq!(r, resumable, "resumable keys of {patch:?}");
            assert_eq!(x, refused, "refused keys of {patch:?}");
        }
        let (r, x) = config_edits(&base, &base);
        assert!(r.is_empty() && x.is_empty());
        let (_, x) = config_edits(&base, &edit_value(&base, "seed", 7));
        assert_eq!((x[0].then.as_str(), x[0].now.as_str()), ("42", "7"));
    }

    fn edit_value(t: &toml::Table, key: &str, v: i64) -> toml::Table {
        let mut t = t.clone();
        t.insert(key.into(), v.into());
        t
    }
}
