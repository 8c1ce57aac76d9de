//! Interop with MiniMind / Hugging Face: `config.json` field names and `model.safetensors`
//! tensor names, read and written. `lm_head.weight` is optional (tied to the embedding).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use super::layout::Layout;
use crate::config::ModelConfig;

/// MiniMind's `config.json` (the fields we read and write; unknown ones are ignored).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default = "model_type")]
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_moe: bool,
    #[serde(default = "d_experts")]
    pub n_routed_experts: usize,
    #[serde(default = "d_topk")]
    pub num_experts_per_tok: usize,
    #[serde(default = "d_shared")]
    pub n_shared_experts: usize,
    #[serde(default = "d_scoring")]
    pub scoring_func: String,
    #[serde(default = "d_alpha")]
    pub aux_loss_alpha: f64,
    #[serde(default = "d_true")]
    pub seq_aux: bool,
    #[serde(default = "d_true")]
    pub norm_topk_prob: bool,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "d_dtype")]
    pub torch_dtype: String,
}

fn model_type() -> String {
    "minimind".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    1e6
}
fn d_max_pos() -> usize {
    32768
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "silu".into()
}
fn d_experts() -> usize {
    4
}
fn d_topk() -> usize {
    2
}
fn d_shared() -> usize {
    1
}
fn d_scoring() -> String {
    "softmax".into()
}
fn d_alpha() -> f64 {
    0.1
}
fn d_bos() -> u32 {
    1
}
fn d_eos() -> u32 {
    2
}
fn d_dtype() -> String {
    "float32".into()
}

impl HfConfig {
    pub fn from_model(m: &ModelConfig) -> HfConfig {
        HfConfig {
            model_type: model_type(),
            architectures: vec!["MiniMindForCausalLM".into()],
            vocab_size: m.vocab_size,
            hidden_size: m.hidden_size,
            num_hidden_layers: m.num_hidden_layers,
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: Some(m.num_key_value_heads),
            head_dim: Some(m.head_dim),
            intermediate_size: Some(m.intermediate_size),
            rms_norm_eps: m.rms_norm_eps,
            rope_theta: m.rope_theta,
            max_position_embeddings: m.max_position_embeddings,
            tie_word_embeddings: true,
            hidden_act: d_act(),
            use_moe: m.use_moe,
            n_routed_experts: m.n_routed_experts,
            num_experts_per_tok: m.num_experts_per_tok,
            n_shared_experts: m.n_shared_experts,
            scoring_func: d_scoring(),
            aux_loss_alpha: m.aux_loss_alpha,
            seq_aux: m.seq_aux,
            norm_topk_prob: m.norm_topk_prob,
            bos_token_id: d_bos(),
            eos_token_id: d_eos(),
            pad_token_id: 0,
            torch_dtype: d_dtype(),
        }
    }

    pub fn to_model(&self) -> Result<ModelConfig> {
        if self.hidden_act != "silu" || self.scoring_func != "softmax" || !self.tie_word_embeddings {
            bail!(
                "unsupported model: hidden_act {:?}, scoring_func {:?}, tie_word_embeddings {} (need silu, softmax, true)",
                self.hidden_act,
                self.scoring_func,
                self.tie_word_embeddings
            );
        }
        let h = self.num_attention_heads;
        let m = ModelConfig {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: h,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(h),
            vocab_size: self.vocab_size,
            intermediate_size: self
                .intermediate_size
                .unwrap_or_else(|| ModelConfig::default_intermediate(self.hidden_size)),
            head_dim: self.head_dim.unwrap_or(self.hidden_size.checked_div(h).unwrap_or(0)),
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            use_moe: self.use_moe,
            n_routed_experts: self.n_routed_experts,
            num_experts_per_tok: self.num_experts_per_tok,
            n_shared_experts: self.n_shared_experts,
            aux_loss_alpha: self.aux_loss_alpha,
            seq_aux: self.seq_aux,
            norm_topk_prob: self.norm_topk_prob,
        };
        m.validate()?;
        Ok(m)
    }
}

/// A model folder in the Hugging Face layout: `config.json` (MiniMind's field names),
/// `model.safetensors` (MiniMind's tensor names; `lm_head.weight` may be absent, tied to the
/// embedding) and `tokenizer.json`. What a run exports (`model/`) and what `eval`, `generate`,
/// `from_weight` and the PyTorch fixtures are read as.
pub struct Folder {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    /// Where its tokenizer.json is (not read here: the data layer loads tokenizers).
    pub tokenizer: PathBuf,
}

/// Reads the model folder `dir` (its config and weights).
pub fn read_folder(dir: &Path) -> Result<Folder> {
    let config = read_config(&dir.join("config.json"))?;
    let params = read_weights_file(&dir.join("model.safetensors"), &Layout::new(&config))?;
    Ok(Folder { config, params, tokenizer: dir.join("tokenizer.json") })
}

/// The weights in the safetensors file `path`, for `layout`.
pub fn read_weights_file(path: &Path, layout: &Layout) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    read_weights(&bytes, layout).with_context(|| format!("loading {}", path.display()))
}

/// Weights for a model of shape `want` from a model folder (checked to be that shape) or a
/// `.safetensors` file: `checkpoint.from_weight`.
pub fn load_weights(path: &Path, want: &ModelConfig, layout: &Layout) -> Result<Vec<f32>> {
    let file = if path.is_dir() {
        let diff = read_config(&path.join("config.json"))?.differences(want, "weights");
        if !diff.is_empty() {
            bail!("{} is another model shape; differing keys:\n  {}", path.display(), diff.join("\n  "));
        }
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    read_weights_file(&file, layout)
}

/// Writes the model folder `dir`: model.safetensors, then (after `between`, a testing aid's
/// crash point) tokenizer.json, then config.json last, each atomically: a config.json means
/// the folder is complete.
pub fn write_folder(
    dir: &Path,
    config: &ModelConfig,
    params: &[f32],
    tokenizer: &Path,
    between: &dyn Fn(),
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let weights = encode_weights(&Layout::new(config), params)?;
    crate::files::write_atomic(&dir.join("model.safetensors"), &weights)?;
    between();
    let tok = std::fs::read(tokenizer).with_context(|| format!("reading {}", tokenizer.display()))?;
    crate::files::write_atomic(&dir.join("tokenizer.json"), &tok)?;
    crate::files::write_atomic(&dir.join("config.json"), config_json(config).as_bytes())
}

pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let hf: HfConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    hf.to_model().with_context(|| format!("in {}", path.display()))
}

pub fn config_json(m: &ModelConfig) -> String {
    serde_json::to_string_pretty(&HfConfig::from_model(m)).expect("config serialises") + "\n"
}

/// Reads every tensor of `layout` from safetensors bytes into one flat f32 buffer
/// (f32, bf16 and f16 files are accepted).
pub fn read_weights(bytes: &[u8], layout: &Layout) -> Result<Vec<f32>> {
    let st = SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    let mut out = vec![0.0f32; layout.total];
    let mut missing = Vec::new();
    for t in &layout.tensors {
        let view = match st.tensor(&t.name) {
            Ok(v) => v,
            Err(_) => {
                missing.push(t.name.clone());
                continue;
            }
        };
        if view.shape() != t.shape.as_slice() {
            bail!("tensor {} has shape {:?}, the model needs {:?}", t.name, view.shape(), t.shape);
        }
        decode(&view, &mut out[t.range.clone()]).with_context(|| format!("tensor {}", t.name))?;
    }
    if !missing.is_empty() {
        bail!(
            "{} tensor(s) missing, e.g. {} (does the model config match the weights?)",
            missing.len(),
            missing[0]
        );
    }
    let unexpected: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| *n != "lm_head.weight" && layout.find(n).is_none())
        .map(str::to_string)
        .collect();
    if let Some(first) = unexpected.first() {
        bail!(
            "{} unexpected tensor(s), e.g. {first} (does the model config match the weights?)",
            unexpected.len()
        );
    }
    Ok(out)
}

/// A tensor's values as f32, from an f32, bf16 or f16 tensor.
pub fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let n: usize = view.shape().iter().product();
    let mut out = vec![0.0; n];
    decode(view, &mut out)?;
    Ok(out)
}

fn decode(view: &TensorView<'_>, out: &mut [f32]) -> Result<()> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        other => bail!("dtype {other:?} is not supported (f32, bf16, f16)"),
    }
    Ok(())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Serialises named f32 tensors (`(name, shape, data)`) to safetensors bytes.
pub fn encode(
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

/// The model's weights under their MiniMind names (no `lm_head.weight`: it is tied).
pub fn encode_weights(layout: &Layout, params: &[f32]) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        layout.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), &params[t.range.clone()])).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    encode(&tensors, Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_table() {
        for (bits, want) in
            [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x3555, 0.333_251_95), (0x0001, 5.960_464_5e-8), (0, 0.0)]
        {
            assert_eq!(f16_to_f32(bits), want, "{bits:#x}");
        }
    }
}
