//! What the run uses: every value filled in (derived ones too), cross-checked, paths made
//! absolute. Built from the merged layers by [`resolve`]; this is what `config.toml` holds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, ConfigErrors, Problems};
use super::file::{DataSection, MetricsSection, ModelSection, TrainSection};
use super::load::Layered;

pub use super::file::{Device, Dtype, Resume, Schedule};

/// The resolved experiment. Each component takes only its own section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Informational values computed from the rest.
    pub derived: Derived,
}

/// The network's shape, complete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    /// hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub use_moe: bool,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub aux_loss_alpha: f64,
    pub seq_aux: bool,
    pub norm_topk_prob: bool,
}

impl ModelConfig {
    /// MiniMind2-small, dense: the model section's defaults, resolved.
    pub fn minimind2_small() -> ModelConfig {
        model_of(&ModelSection::default())
    }

    /// Feed-forward width MiniMind derives from the hidden size: 64*ceil(8h/3/64).
    pub fn default_intermediate(hidden: usize) -> usize {
        let raw = hidden * 8 / 3;
        64 * raw.div_ceil(64)
    }

    /// Total trainable parameters (the output head is tied to the embedding).
    /// Keys whose values differ between this model (the one `what` was made for) and `now`,
    /// as `model.key (A in the <what>, B now)`.
    pub fn differences(&self, now: &ModelConfig, what: &str) -> Vec<String> {
        let (Ok(toml::Value::Table(x)), Ok(toml::Value::Table(y))) =
            (toml::Value::try_from(self), toml::Value::try_from(now))
        else {
            return vec!["model".into()];
        };
        x.iter()
            .filter(|(k, v)| y.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "model.{k} ({} in the {what}, {} now)",
                    v,
                    y.get(k).map_or("-".into(), |v| v.to_string())
                )
            })
            .collect()
    }

    pub fn parameter_count(&self) -> u64 {
        let c = self.hidden_size as u64;
        let d = self.head_dim as u64;
        let (h, g) = (self.num_attention_heads as u64, self.num_key_value_heads as u64);
        let ffn = 3 * c * self.intermediate_size as u64;
        let attn = c * h * d * 2 + c * g * d * 2;
        let mlp = if self.use_moe {
            (self.n_routed_experts + self.n_shared_experts) as u64 * ffn + self.n_routed_experts as u64 * c
        } else {
            ffn
        };
        let layer = attn + mlp + 2 * c;
        self.vocab_size as u64 * c + self.num_hidden_layers as u64 * layer + c
    }
}

/// Data, with absolute paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub path: PathBuf,
    pub tokenizer: PathBuf,
    pub max_seq_len: usize,
    pub packing: bool,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    pub skip_bad_lines: bool,
    pub num_workers: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_path: Option<PathBuf>,
    #[serde(default)]
    pub val_fraction: f64,
}

/// Optimisation settings; nothing to derive, so the file's form is the resolved form.
pub type TrainConfig = TrainSection;

/// What a run records besides metrics.csv, as written.
pub type MetricsConfig = MetricsSection;

/// Checkpointing, with absolute paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub log_interval: usize,
    pub save_interval: usize,
    pub keep_last: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_interval: Option<usize>,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from_weight: Option<PathBuf>,
    pub resume: Resume,
    pub save_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Derived {
    /// Trainable parameters.
    pub parameters: u64,
    /// Tokens per optimiser step: batch_size * accumulation_steps * max_seq_len.
    pub tokens_per_step: u64,
}

fn default_eval_batches() -> usize {
    4
}

/// Fills derived values, makes paths absolute and checks cross-field rules; reports every
/// problem found, each at the origin of the value at fault.
pub fn resolve(l: &Layered) -> Result<Config, ConfigErrors> {
    let f = &l.merged;
    let err = |key: &str, msg: String| ConfigError::new(l.origin_of(key), Some(key), msg);
    let mut problems = Problems::default();
    let positive = |problems: &mut Problems, key: &str, v: usize| {
        if v == 0 {
            problems.push(err(key, "must be greater than 0".into()));
        }
    };

    let name = f.name.trim().to_string();
    let name_ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !name_ok {
        problems.push(
            err("name", format!("`{name}` is not usable in a folder name"))
                .hint("use letters, digits, '-', '_' and '.'"),
        );
    }

    let model = model_of(&f.model);
    for p in model.check(&|key| format!(", from {}", l.origin_of(key))) {
        problems.push(err(p.key, p.message));
    }
    let data = problems.take(resolve_data(&f.data, l));
    if let Some(d) = &data {
        // The model must have a row for every id the tokenizer can emit (ids need not be dense).
        match crate::data::tokenizer::Tok::load(&d.tokenizer) {
            Ok(tok) if tok.id_limit > model.vocab_size => problems.push(
                err(
                    "data.tokenizer",
                    format!(
                        "{} emits ids up to {}, past model.vocab_size = {} (from {})",
                        d.tokenizer.display(),
                        tok.id_limit - 1,
                        model.vocab_size,
                        l.origin_of("model.vocab_size")
                    ),
                )
                .hint(format!("set model.vocab_size = {}", tok.id_limit)),
            ),
            Ok(_) => {}
            Err(e) => problems.push(err("data.tokenizer", format!("{e:#}"))),
        }
    }
    if f.data.max_seq_len > model.max_position_embeddings {
        problems.push(err(
            "data.max_seq_len",
            format!(
                "{} is above model.max_position_embeddings ({}, from {})",
                f.data.max_seq_len,
                model.max_position_embeddings,
                l.origin_of("model.max_position_embeddings")
            ),
        ));
    }
    let t = &f.train;
    positive(&mut problems, "train.batch_size", t.batch_size);
    positive(&mut problems, "train.accumulation_steps", t.accumulation_steps);
    match t.max_steps {
        Some(steps) => positive(&mut problems, "train.max_steps", steps),
        None => positive(&mut problems, "train.epochs", t.epochs),
    }
    let mut check = |ok: bool, key: &str, msg: String| {
        if !ok {
            problems.push(err(key, msg));
        }
    };
    let lr = t.learning_rate;
    check(lr.is_finite() && lr > 0.0, "train.learning_rate", format!("{lr} must be a positive number"));
    let wd = t.weight_decay;
    check(wd.is_finite() && wd >= 0.0, "train.weight_decay", format!("{wd} must be >= 0"));
    let betas_ok = t.betas.iter().all(|b| (0.0..1.0).contains(b));
    check(betas_ok, "train.betas", format!("{:?}: each beta must be in [0, 1)", t.betas));
    check(t.eps.is_finite() && t.eps > 0.0, "train.eps", format!("{} must be a positive number", t.eps));
    let clip = t.grad_clip;
    check(
        clip.is_finite() && clip >= 0.0,
        "train.grad_clip",
        format!("{clip} must be >= 0 (0 disables clipping)"),
    );
    let ratio = t.min_lr_ratio;
    check((0.0..=1.0).contains(&ratio), "train.min_lr_ratio", format!("{ratio} must be in [0, 1]"));

    let c = &f.checkpoint;
    positive(&mut problems, "checkpoint.log_interval", c.log_interval);
    positive(&mut problems, "checkpoint.save_interval", c.save_interval);
    positive(&mut problems, "checkpoint.keep_last", c.keep_last);
    positive(&mut problems, "checkpoint.eval_batches", c.eval_batches);
    positive(&mut problems, "launcher.jobs", f.launcher.jobs);
    positive(&mut problems, "launcher.cpus_per_task", f.launcher.cpus_per_task);
    positive(&mut problems, "launcher.tasks_per_point", f.launcher.tasks_per_point);
    if let Some(n) = c.eval_interval {
        positive(&mut problems, "checkpoint.eval_interval", n);
    }
    let from_weight = match &c.from_weight {
        Some(p) => problems.take(existing_path(l, "checkpoint.from_weight", p)),
        None => None,
    };
    problems.finish()?;
    let data = data.expect("no problems, so the data section resolved");
    let checkpoint = CheckpointConfig {
        log_interval: c.log_interval,
        save_interval: c.save_interval,
        keep_last: c.keep_last,
        eval_interval: c.eval_interval,
        eval_batches: c.eval_batches,
        from_weight,
        resume: c.resume,
        save_dir: absolute(&l.base_dir_of("checkpoint.save_dir").join(&c.save_dir)),
    };
    let derived = Derived {
        parameters: model.parameter_count(),
        tokens_per_step: (t.batch_size * t.accumulation_steps * data.max_seq_len) as u64,
    };
    let metrics = f.metrics.clone();
    Ok(Config { name, seed: f.seed, model, data, train: t.clone(), checkpoint, metrics, derived })
}

/// The model section with its derived values filled in (not yet checked).
fn model_of(m: &ModelSection) -> ModelConfig {
    ModelConfig {
        hidden_size: m.hidden_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        vocab_size: m.vocab_size,
        intermediate_size: m
            .intermediate_size
            .unwrap_or_else(|| ModelConfig::default_intermediate(m.hidden_size)),
        head_dim: m.hidden_size.checked_div(m.num_attention_heads).unwrap_or(0),
        rope_theta: m.rope_theta,
        rms_norm_eps: m.rms_norm_eps,
        max_position_embeddings: m.max_position_embeddings,
        use_moe: m.use_moe,
        n_routed_experts: m.n_routed_experts,
        num_experts_per_tok: m.num_experts_per_tok,
        n_shared_experts: m.n_shared_experts,
        aux_loss_alpha: m.aux_loss_alpha,
        seq_aux: m.seq_aux,
        norm_topk_prob: m.norm_topk_prob,
    }
}

/// A model shape rule that is broken: the key at fault and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelProblem {
    pub key: &'static str,
    pub message: String,
}

impl ModelConfig {
    /// The shape rules, in one place: resolving an experiment, reading a `config.json` and
    /// building an engine all go through them. `from(key)` says where a related value came
    /// from (such as ", from default"), or nothing.
    pub fn check(&self, from: &dyn Fn(&str) -> String) -> Vec<ModelProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &'static str, message: String| out.push(ModelProblem { key, message });
        for (key, v) in [
            ("model.hidden_size", self.hidden_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
            ("model.num_key_value_heads", self.num_key_value_heads),
            ("model.vocab_size", self.vocab_size),
            ("model.intermediate_size", self.intermediate_size),
            ("model.max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        let (c, h, g) = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads);
        if h > 0 && !c.is_multiple_of(h) {
            bad(
                "model.hidden_size",
                format!(
                    "{c} is not divisible by model.num_attention_heads ({h}{})",
                    from("model.num_attention_heads")
                ),
            );
        } else if h > 0 && self.head_dim * h != c {
            bad(
                "model.head_dim",
                format!("{} must be hidden_size / num_attention_heads = {}", self.head_dim, c / h),
            );
        } else if h > 0 && !self.head_dim.is_multiple_of(2) {
            bad(
                "model.num_attention_heads",
                format!(
                    "head_dim = model.hidden_size ({c}{}) / {h} = {} must be even for RoPE",
                    from("model.hidden_size"),
                    self.head_dim
                ),
            );
        }
        if g > 0 && !h.is_multiple_of(g) {
            bad(
                "model.num_attention_heads",
                format!(
                    "{h} is not a multiple of model.num_key_value_heads ({g}{})",
                    from("model.num_key_value_heads")
                ),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bad("model.rope_theta", format!("{} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bad("model.rms_norm_eps", format!("{} must be a positive number", self.rms_norm_eps));
        }
        if self.use_moe {
            let (e, k) = (self.n_routed_experts, self.num_experts_per_tok);
            if e == 0 {
                bad("model.n_routed_experts", "must be greater than 0 with use_moe".into());
            }
            if k == 0 || k > e {
                bad(
                    "model.num_experts_per_tok",
                    format!(
                        "{k} must be between 1 and model.n_routed_experts ({e}{})",
                        from("model.n_routed_experts")
                    ),
                );
            }
            if !(self.aux_loss_alpha.is_finite() && self.aux_loss_alpha >= 0.0) {
                bad("model.aux_loss_alpha", format!("{} must be >= 0", self.aux_loss_alpha));
            }
        }
        out
    }

    /// [`ModelConfig::check`] as one error naming every broken rule.
    pub fn validate(&self) -> anyhow::Result<()> {
        let problems = self.check(&|_| String::new());
        if problems.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect();
        anyhow::bail!("invalid model shape: {}", list.join("; "))
    }
}

fn resolve_data(d: &DataSection, l: &Layered) -> Result<DataConfig, ConfigErrors> {
    let mut problems = Problems::default();
    if d.max_seq_len < 2 {
        problems.push(ConfigError::new(
            l.origin_of("data.max_seq_len"),
            Some("data.max_seq_len"),
            format!("{} is too short: a row needs at least bos and eos", d.max_seq_len),
        ));
    }
    let path = problems.take(data_path(l, "data.path", &d.path));
    let tokenizer = problems.take(existing_path(l, "data.tokenizer", &d.tokenizer).and_then(|p| {
        if p.is_dir() {
            Err(ConfigError::new(
                l.origin_of("data.tokenizer"),
                Some("data.tokenizer"),
                format!("{} is a folder; the tokenizer is a file (tokenizer.json)", p.display()),
            ))
        } else {
            Ok(p)
        }
    }));
    let val_path = match &d.val_path {
        Some(p) => problems.take(data_path(l, "data.val_path", p)),
        None => None,
    };
    if d.text_field.is_empty() {
        problems.push(ConfigError::new(l.origin_of("data.text_field"), Some("data.text_field"), "is empty"));
    }
    let frac = d.val_fraction;
    let err = |key: &str, msg: String| ConfigError::new(l.origin_of(key), Some(key), msg);
    if !(0.0..1.0).contains(&frac) {
        problems.push(err("data.val_fraction", format!("{frac} must be in [0, 1)")));
    } else if frac > 0.0 && d.val_path.is_some() {
        problems.push(err(
            "data.val_fraction",
            format!("{frac} holds data out, but data.val_path (from {}) already gives validation data: choose one", l.origin_of("data.val_path")),
        ));
    } else if frac > 0.0 && d.packing {
        problems.push(
            err(
                "data.val_fraction",
                format!(
                    "{frac} holds documents out, which packed rows (data.packing = true, from {}) cannot do",
                    l.origin_of("data.packing")
                ),
            )
            .hint("set data.val_path to a file of validation documents instead"),
        );
    }
    problems.finish()?;
    Ok(DataConfig {
        path: path.expect("checked"),
        tokenizer: tokenizer.expect("checked"),
        max_seq_len: d.max_seq_len,
        packing: d.packing,
        text_field: d.text_field.clone(),
        skip_bad_lines: d.skip_bad_lines,
        num_workers: d.num_workers,
        val_path,
        val_fraction: frac,
    })
}

fn default_text_field() -> String {
    "text".into()
}

/// Resolves a data path (a file, a folder or a glob) against the folder of the layer that set
/// it; it must name at least one shard.
fn data_path(l: &Layered, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    let path = absolute(&l.base_dir_of(key).join(value));
    match crate::data::source::shards(&path) {
        Ok(_) => Ok(path),
        Err(why) => Err(ConfigError::new(l.origin_of(key), Some(key), format!("{why:#}"))),
    }
}

/// Resolves a path value against the folder of the layer that set it; it must exist.
fn existing_path(l: &Layered, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    let path = absolute(&l.base_dir_of(key).join(value));
    if !path.exists() {
        return Err(ConfigError::new(
            l.origin_of(key),
            Some(key),
            format!("{} does not exist", path.display()),
        ));
    }
    Ok(path)
}

fn absolute(p: &Path) -> PathBuf {
    let joined = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // Normalise `a/../b` without touching the file system (the path may not exist yet).
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_size_table() {
        // MiniMind: 512 -> 1408, 640 -> 1728, 768 -> 2048, 64 -> 192.
        for (h, want) in [(512, 1408), (640, 1728), (768, 2048), (64, 192), (96, 256)] {
            assert_eq!(ModelConfig::default_intermediate(h), want, "hidden {h}");
        }
    }
}
