//! Experiment configuration: the file types, layering, resolution, sweeps.
//!
//! `load` is the entry point: it layers one experiment file with environment and `--set`
//! overrides, expands its sweep and resolves every point.

mod error;
mod file;
mod keys;
mod load;
mod resolve;
mod sweep;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors, Origin};
pub use file::{ExperimentFile, LauncherKind, LauncherSection};
pub use load::{Assign, EnvLayer, Layered, OWN_VARS, env_name, is_config_var, parse_env, parse_set};
pub use resolve::{
    CheckpointConfig, Config, DataConfig, Derived, Device, Dtype, MetricsConfig, ModelConfig, ModelProblem,
    Resume, Schedule, TrainConfig,
};
pub use sweep::short_float;

/// One run the experiment asks for.
#[derive(Debug)]
pub struct PlannedRun {
    /// The sweep tag, for runs of a sweep.
    pub tag: Option<String>,
    pub config: Config,
    /// The layers behind this run (for sources and meta.json).
    pub layered: Layered,
}

/// Loads, layers, expands and resolves an experiment: one planned run per sweep point, or one.
pub fn load(path: &Path, env: &[Assign], sets: &[Assign]) -> Result<Vec<PlannedRun>, ConfigErrors> {
    let base = load::layer(path, env, sets, &[])?;
    let Some(sweep) = base.merged.sweep.clone() else {
        let config = resolve::resolve(&base)?;
        return Ok(vec![PlannedRun { tag: None, config, layered: base }]);
    };
    let locate =
        |section: &str, key: &str| base.origin_at(&format!("sweep.{section}"), &["sweep", section, key]);
    for (section, axis) in [("grid", &sweep.grid), ("zip", &sweep.zip)] {
        for key in axis.keys() {
            if !keys::is_sweepable(key) {
                let err = ConfigError::new(locate(section, key), Some(key), "cannot be swept: unknown key");
                return Err(match keys::suggest(key) {
                    Some(s) => err.hint(format!("did you mean `{s}`?")),
                    None => err.hint("sweep keys are dotted config keys such as train.learning_rate"),
                }
                .into());
            }
            if let Some(set) = sets.iter().find(|s| s.key == *key) {
                return Err(ConfigError::new(
                    set.origin.clone(),
                    Some(key),
                    format!("this key is swept by {}; --set cannot override it", locate(section, key)),
                )
                .into());
            }
        }
    }
    let points = sweep::expand(&sweep.grid, &sweep.zip)
        .map_err(|e| ConfigError::new(locate(e.section, &e.key), Some(&e.key), e.message))?;
    let mut problems = error::Problems::default();
    if points.is_empty() {
        let config = resolve::resolve(&base)?;
        return Ok(vec![PlannedRun { tag: None, config, layered: base }]);
    }
    let sweep_path = base.path().to_path_buf();
    let runs: Vec<PlannedRun> = points
        .into_iter()
        .filter_map(|point| {
            let assigns: Vec<Assign> = point
                .values
                .iter()
                .map(|(key, value)| Assign {
                    origin: Origin::Sweep { path: sweep_path.clone(), tag: point.tag.clone() },
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            let layered = problems.take(load::layer(path, env, sets, &assigns))?;
            let config = problems.take(resolve::resolve(&layered))?;
            Some(PlannedRun { tag: Some(point.tag), config, layered })
        })
        .collect();
    problems.finish()?;
    Ok(runs)
}

/// A run folder's `config.toml`, resolved and validated as a fresh run's config is (hand edits
/// get located errors), with `sets` on top.
pub fn load_run_config(path: &Path, sets: &[Assign]) -> Result<(Config, Layered), ConfigErrors> {
    let layered = load::layer_run_config(path, sets)?;
    let config = resolve::resolve(&layered)?;
    Ok((config, layered))
}

/// The resolved config as TOML; with `sources`, each value is followed by where it came from.
pub fn render(config: &Config, layered: Option<&Layered>) -> String {
    let text = toml::to_string(config).expect("the resolved config is TOML-serialisable");
    let Some(layered) = layered else { return text };
    let mut section = String::new();
    let mut out = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            out.push_str(line);
        } else if let Some((k, _)) = line.split_once(" = ") {
            let key = if section.is_empty() { k.to_string() } else { format!("{section}.{k}") };
            let origin = if section == "derived" || key == "model.head_dim" {
                Origin::Derived
            } else {
                layered.origin_of(&key)
            };
            out.push_str(&format!("{line}  # {origin}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Every value that did not come from a default: (key, value as TOML, origin).
pub fn overrides(layered: &Layered) -> Vec<(String, String, Origin)> {
    let value = |key: &str| {
        layered
            .figment
            .find_value(key)
            .ok()
            .and_then(|v| toml::Value::try_from(v).ok())
            .map_or_else(String::new, |v| v.to_string())
    };
    load::keys_set_outside_defaults(layered)
        .into_iter()
        .map(|k| {
            let origin = layered.origin_of(&k);
            (k.clone(), value(&k), origin)
        })
        .collect()
}

/// The JSON schema of experiment files.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(ExperimentFile);
    let mut s = serde_json::to_string_pretty(&schema).expect("schema serialises");
    s.push('\n');
    s
}

/// Every valid dotted key (for the README and tests).
pub fn all_keys() -> &'static [String] {
    keys::leaf_keys()
}
