//! What the run uses: every value filled in (derived ones too), cross-checked, paths made
//! absolute. Built from the merged layers by [`resolve`]; this is what `config.toml` holds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::file::{DataSection, ModelSection, TrainSection};
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
    /// Feed-forward width MiniMind derives from the hidden size: 64*ceil(8h/3/64).
    pub fn default_intermediate(hidden: usize) -> usize {
        let raw = hidden * 8 / 3;
        64 * raw.div_ceil(64)
    }

    /// Total trainable parameters (the output head is tied to the embedding).
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
    pub skip_bad_lines: bool,
    pub num_workers: usize,
}

/// Optimisation settings; nothing to derive, so the file's form is the resolved form.
pub type TrainConfig = TrainSection;

/// Checkpointing, with absolute paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub log_interval: usize,
    pub save_interval: usize,
    pub keep_last: usize,
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

/// Fills derived values, makes paths absolute and checks cross-field rules.
pub fn resolve(l: &Layered) -> Result<Config, ConfigError> {
    let f = &l.merged;
    let err = |key: &str, msg: String| ConfigError::new(l.origin_of(key), Some(key), msg);
    let positive = |key: &str, v: usize| {
        if v == 0 { Err(err(key, "must be greater than 0".into())) } else { Ok(()) }
    };

    let name = f.name.trim().to_string();
    let name_ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !name_ok {
        return Err(err("name", format!("`{name}` is not usable in a folder name"))
            .hint("use letters, digits, '-', '_' and '.'"));
    }

    let model = resolve_model(&f.model, l)?;
    let data = resolve_data(&f.data, l)?;
    if data.max_seq_len > model.max_position_embeddings {
        return Err(err(
            "data.max_seq_len",
            format!(
                "{} is above model.max_position_embeddings ({}, from {})",
                data.max_seq_len,
                model.max_position_embeddings,
                l.origin_of("model.max_position_embeddings")
            ),
        ));
    }
    let t = &f.train;
    positive("train.batch_size", t.batch_size)?;
    positive("train.accumulation_steps", t.accumulation_steps)?;
    if t.max_steps.is_none() {
        positive("train.epochs", t.epochs)?;
    }
    if let Some(steps) = t.max_steps {
        positive("train.max_steps", steps)?;
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        return Err(err("train.learning_rate", format!("{} must be a positive number", t.learning_rate)));
    }
    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        return Err(err("train.weight_decay", format!("{} must be >= 0", t.weight_decay)));
    }
    if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return Err(err("train.betas", format!("{:?}: each beta must be in [0, 1)", t.betas)));
    }
    if !(t.eps.is_finite() && t.eps > 0.0) {
        return Err(err("train.eps", format!("{} must be a positive number", t.eps)));
    }
    if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
        return Err(err("train.grad_clip", format!("{} must be >= 0 (0 disables clipping)", t.grad_clip)));
    }
    if !(0.0..=1.0).contains(&t.min_lr_ratio) {
        return Err(err("train.min_lr_ratio", format!("{} must be in [0, 1]", t.min_lr_ratio)));
    }

    let c = &f.checkpoint;
    positive("checkpoint.log_interval", c.log_interval)?;
    positive("checkpoint.save_interval", c.save_interval)?;
    positive("checkpoint.keep_last", c.keep_last)?;
    let from_weight = match &c.from_weight {
        Some(p) => Some(existing_path(l, "checkpoint.from_weight", p)?),
        None => None,
    };
    let checkpoint = CheckpointConfig {
        log_interval: c.log_interval,
        save_interval: c.save_interval,
        keep_last: c.keep_last,
        from_weight,
        resume: c.resume,
        save_dir: absolute(&l.base_dir_of("checkpoint.save_dir").join(&c.save_dir)),
    };

    let derived = Derived {
        parameters: model.parameter_count(),
        tokens_per_step: (t.batch_size * t.accumulation_steps * data.max_seq_len) as u64,
    };
    Ok(Config { name, seed: f.seed, model, data, train: t.clone(), checkpoint, derived })
}

fn resolve_model(m: &ModelSection, l: &Layered) -> Result<ModelConfig, ConfigError> {
    let err = |key: &str, msg: String| ConfigError::new(l.origin_of(key), Some(key), msg);
    for (key, v) in [
        ("model.hidden_size", m.hidden_size),
        ("model.num_hidden_layers", m.num_hidden_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_key_value_heads", m.num_key_value_heads),
        ("model.vocab_size", m.vocab_size),
        ("model.max_position_embeddings", m.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(err(key, "must be greater than 0".into()));
        }
    }
    if !m.hidden_size.is_multiple_of(m.num_attention_heads) {
        return Err(err(
            "model.hidden_size",
            format!(
                "{} is not divisible by model.num_attention_heads ({}, from {})",
                m.hidden_size,
                m.num_attention_heads,
                l.origin_of("model.num_attention_heads")
            ),
        ));
    }
    let head_dim = m.hidden_size / m.num_attention_heads;
    if !head_dim.is_multiple_of(2) {
        return Err(err(
            "model.num_attention_heads",
            format!("head_dim = hidden_size / num_attention_heads = {head_dim} must be even for RoPE"),
        ));
    }
    if !m.num_attention_heads.is_multiple_of(m.num_key_value_heads) {
        return Err(err(
            "model.num_attention_heads",
            format!(
                "{} is not a multiple of model.num_key_value_heads ({}, from {})",
                m.num_attention_heads,
                m.num_key_value_heads,
                l.origin_of("model.num_key_value_heads")
            ),
        ));
    }
    let intermediate_size =
        m.intermediate_size.unwrap_or_else(|| ModelConfig::default_intermediate(m.hidden_size));
    if intermediate_size == 0 {
        return Err(err("model.intermediate_size", "must be greater than 0".into()));
    }
    if !(m.rope_theta.is_finite() && m.rope_theta > 0.0) {
        return Err(err("model.rope_theta", format!("{} must be a positive number", m.rope_theta)));
    }
    if !(m.rms_norm_eps.is_finite() && m.rms_norm_eps > 0.0) {
        return Err(err("model.rms_norm_eps", format!("{} must be a positive number", m.rms_norm_eps)));
    }
    if m.use_moe {
        if m.n_routed_experts == 0 {
            return Err(err("model.n_routed_experts", "must be greater than 0 with use_moe".into()));
        }
        if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.n_routed_experts {
            return Err(err(
                "model.num_experts_per_tok",
                format!(
                    "{} must be between 1 and model.n_routed_experts ({}, from {})",
                    m.num_experts_per_tok,
                    m.n_routed_experts,
                    l.origin_of("model.n_routed_experts")
                ),
            ));
        }
        if !(m.aux_loss_alpha.is_finite() && m.aux_loss_alpha >= 0.0) {
            return Err(err("model.aux_loss_alpha", format!("{} must be >= 0", m.aux_loss_alpha)));
        }
    }
    Ok(ModelConfig {
        hidden_size: m.hidden_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        vocab_size: m.vocab_size,
        intermediate_size,
        head_dim,
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
    })
}

fn resolve_data(d: &DataSection, l: &Layered) -> Result<DataConfig, ConfigError> {
    if d.max_seq_len < 2 {
        return Err(ConfigError::new(
            l.origin_of("data.max_seq_len"),
            Some("data.max_seq_len"),
            format!("{} is too short: a row needs at least bos and eos", d.max_seq_len),
        ));
    }
    Ok(DataConfig {
        path: existing_path(l, "data.path", &d.path)?,
        tokenizer: existing_path(l, "data.tokenizer", &d.tokenizer)?,
        max_seq_len: d.max_seq_len,
        packing: d.packing,
        skip_bad_lines: d.skip_bad_lines,
        num_workers: d.num_workers,
    })
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
