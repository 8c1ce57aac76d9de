//! What the user writes: the experiment file's serde types.
//!
//! Every field has a default equal to MiniMind's pretraining default, so a partial file (or a
//! single environment variable) deserialises on its own; that is how each layer is checked
//! separately with an exact location. The resolved form the run uses is in `resolve.rs`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One experiment: a model, its data and how to train it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentFile {
    /// Short name of the experiment; run folders are named `<timestamp>-<name>[-<sweep tag>]`.
    /// MiniMind's `--save_weight` prefix plays this role. Typical: "moe_small".
    pub name: String,
    /// Another experiment file this one starts from (relative to this file). Values here
    /// override the ones there; chains are allowed, cycles are errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Seed for weight initialisation, data shuffling and sampling. Typical: 42.
    pub seed: u64,
    /// The network's shape.
    pub model: ModelSection,
    /// Training data and its encoding.
    pub data: DataSection,
    /// Optimisation: steps, batch, learning rate, precision, device.
    pub train: TrainSection,
    /// Logging, checkpoints, resuming and where runs are written.
    pub checkpoint: CheckpointSection,
    /// What a run records besides metrics.csv.
    pub metrics: MetricsSection,
    /// A grid (and/or zip) of values for dotted keys; one run per point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepSection>,
    /// Where a sweep's points run: on this machine, or as a Slurm job array.
    pub launcher: LauncherSection,
}

impl Default for ExperimentFile {
    fn default() -> Self {
        ExperimentFile {
            name: "experiment".into(),
            extends: None,
            seed: 42,
            model: ModelSection::default(),
            data: DataSection::default(),
            train: TrainSection::default(),
            checkpoint: CheckpointSection::default(),
            metrics: MetricsSection::default(),
            sweep: None,
            launcher: LauncherSection::default(),
        }
    }
}

/// MiniMind's model hyper-parameters (names as in its `MiniMindConfig`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Width of the residual stream, C. MiniMind2-small: 512; MiniMind2: 768.
    pub hidden_size: usize,
    /// Number of transformer blocks. Typical: 8 (small) or 16.
    pub num_hidden_layers: usize,
    /// Query heads, H. head_dim = hidden_size / num_attention_heads. Typical: 8.
    pub num_attention_heads: usize,
    /// Key/value heads, G (grouped-query attention; divides num_attention_heads). Typical: 2.
    pub num_key_value_heads: usize,
    /// Vocabulary size; must match the tokenizer. MiniMind's tokenizer: 6400.
    pub vocab_size: usize,
    /// Width of the SwiGLU feed-forward. Derived when absent: 64*ceil(8*hidden/3/64)
    /// (1408 for hidden 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// RoPE base frequency theta. MiniMind: 1e6.
    pub rope_theta: f64,
    /// Epsilon inside RMSNorm's square root. MiniMind: 1e-5.
    pub rms_norm_eps: f64,
    /// Longest sequence the model is built for (RoPE table length). MiniMind: 32768.
    pub max_position_embeddings: usize,
    /// Replace every feed-forward by a mixture of experts.
    pub use_moe: bool,
    /// MoE: number of routed experts, E. MiniMind: 4.
    pub n_routed_experts: usize,
    /// MoE: experts chosen per token, K (top-k). MiniMind: 2.
    pub num_experts_per_tok: usize,
    /// MoE: experts every token goes through, added to the routed output. MiniMind: 1.
    pub n_shared_experts: usize,
    /// MoE: weight of the load-balancing auxiliary loss. MiniMind: 0.1.
    pub aux_loss_alpha: f64,
    /// MoE: compute the auxiliary loss per sequence (true) or over all tokens (false).
    pub seq_aux: bool,
    /// MoE: renormalise the top-k router weights to sum to 1 (only when K > 1).
    pub norm_topk_prob: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            hidden_size: 512,
            num_hidden_layers: 8,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            vocab_size: 6400,
            intermediate_size: None,
            rope_theta: 1e6,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 32768,
            use_moe: false,
            n_routed_experts: 4,
            num_experts_per_tok: 2,
            n_shared_experts: 1,
            aux_loss_alpha: 0.1,
            seq_aux: true,
            norm_topk_prob: true,
        }
    }
}

/// Where the text comes from and how it becomes token rows.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// The training documents (relative to this file): a JSON-lines file (one `{"text": ...}`
    /// per line), a folder of shards, or a glob such as "fineweb/sample/*.parquet"; shards are
    /// read in sorted path order, by extension: `.jsonl`/`.json`, `.jsonl.zst`, `.jsonl.gz`,
    /// `.parquet`. MiniMind's `--data_path`.
    pub path: String,
    /// Hugging Face `tokenizer.json` (relative to this file).
    pub tokenizer: String,
    /// Tokens per training row, T. MiniMind: 512.
    pub max_seq_len: usize,
    /// false: one document per row as MiniMind does (`[bos] + tokens[:T-2] + [eos]`, padded);
    /// true: documents joined with eos and cut into full rows.
    pub packing: bool,
    /// The JSON field (or Parquet column) holding each document's text.
    pub text_field: String,
    /// Skip (and count) malformed lines, damaged compressed data and damaged Parquet row
    /// groups instead of failing on the first one.
    pub skip_bad_lines: bool,
    /// Threads used to tokenise the data when building the token cache; 0 = all cores.
    /// MiniMind's `--num_workers`.
    pub num_workers: usize,
    /// Validation data: a second file, folder or glob as `path` (relative to this file); its first
    /// `checkpoint.eval_batches x train.batch_size` documents, encoded as `minimind eval` does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_path: Option<String>,
    /// Validation data held out of `path`: this share of its documents, chosen by the seed and
    /// never trained on (0: none). Needs `packing = false`. Typical: 0.01.
    pub val_fraction: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            path: "data/pretrain_hq.jsonl".into(),
            tokenizer: "data/minimind_tokenizer.json".into(),
            max_seq_len: 512,
            packing: false,
            text_field: "text".into(),
            skip_bad_lines: false,
            num_workers: 0,
            val_path: None,
            val_fraction: 0.0,
        }
    }
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// MiniMind's: lr * (0.1 + 0.45 * (1 + cos(pi * t / total))), no warm-up.
    Minimind,
    /// Linear warm-up over `warmup_steps`, then cosine down to `min_lr_ratio * lr`.
    WarmupCosine,
    /// The same learning rate throughout.
    Constant,
}

/// Precision of matrix-product inputs and activations (weights and optimiser state stay f32).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// Full single precision everywhere (the CPU engine's precision).
    Float32,
    /// bfloat16 matrix products (CUDA).
    Bfloat16,
    /// float16 matrix products with loss scaling (CUDA).
    Float16,
}

impl Dtype {
    /// The name a config file spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        }
    }
}

/// Where the engine runs: `auto`, `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a driver and GPU are present, else CPU.
    Auto,
    /// The CPU engine (gemm + rayon).
    Cpu,
    /// The NVIDIA GPU with this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{other}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Device, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Device {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Device".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Where the engine runs: `auto` (CUDA when a driver and a GPU are found, else the CPU), `cpu`, `cuda` (the first GPU) or `cuda:N`.",
            "type": "string",
            "pattern": "^(auto|cpu|cuda(:[0-9]+)?)$"
        })
    }
}

/// How long and how fast to train.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Passes over the data. MiniMind: 1.
    pub epochs: usize,
    /// Stop after this many optimiser steps (overrides `epochs` when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Rows per micro-batch, B. MiniMind: 32.
    pub batch_size: usize,
    /// Micro-batches per optimiser step. MiniMind: 8.
    pub accumulation_steps: usize,
    /// Peak learning rate. MiniMind: 5e-4.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay, applied to every parameter as MiniMind does. 0.01.
    pub weight_decay: f64,
    /// AdamW (beta1, beta2). (0.9, 0.999).
    pub betas: [f64; 2],
    /// AdamW epsilon. 1e-8.
    pub eps: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping. MiniMind: 1.0.
    pub grad_clip: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Warm-up optimiser steps for `warmup_cosine`.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak, for `warmup_cosine`. Typical: 0.1.
    pub min_lr_ratio: f64,
    /// Precision of matrix products. MiniMind: bfloat16 (the CPU engine needs float32).
    pub dtype: Dtype,
    /// Where to train: auto, cpu, cuda, cuda:N. MiniMind's `--device`.
    pub device: Device,
    /// CPU threads for the engine; 0 = all cores.
    pub threads: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            accumulation_steps: 8,
            learning_rate: 5e-4,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: Schedule::Minimind,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            dtype: Dtype::Bfloat16,
            device: Device::Auto,
            threads: 0,
        }
    }
}

/// Whether to continue from the run's last checkpoint.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Resume {
    /// Always start a new run.
    Never,
    /// Continue the newest run of this experiment that has a complete checkpoint and did not
    /// complete; start a new run when there is none. MiniMind's `--from_resume 1`.
    Auto,
}

/// Logging, checkpointing and the runs folder.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Optimiser steps between rows of metrics.csv. MiniMind: 100.
    pub log_interval: usize,
    /// Optimiser steps between checkpoints (one is always written at the end). MiniMind: 100.
    pub save_interval: usize,
    /// Complete checkpoints kept; older ones are deleted. Typical: 3.
    pub keep_last: usize,
    /// Optimiser steps between validation losses (with validation data; also at the end).
    /// Unset: only at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<usize>,
    /// Micro-batches of validation data per validation loss. Typical: 4.
    pub eval_batches: usize,
    /// Start from these weights: an exported model folder or a `.safetensors` file (relative
    /// to this file). MiniMind's `--from_weight`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_weight: Option<String>,
    /// Continue an interrupted run of this experiment. MiniMind's `--from_resume`.
    pub resume: Resume,
    /// Folder that receives the run folders (relative to the current directory unless set in
    /// a file). MiniMind's `--save_dir`.
    pub save_dir: String,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            log_interval: 100,
            save_interval: 100,
            keep_last: 3,
            eval_interval: None,
            eval_batches: 4,
            from_weight: None,
            resume: Resume::Never,
            save_dir: "runs".into(),
        }
    }
}

/// What a run records besides metrics.csv (which it always writes).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Also write TensorBoard event files (the scalars of metrics.csv and the resolved config)
    /// into the run folder: `tensorboard --logdir runs/` shows every run and sweep point.
    pub tensorboard: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { tensorboard: true }
    }
}

/// Values to sweep over. Keys are dotted config keys such as `train.learning_rate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSection {
    /// Cartesian product: every combination of the listed values (keys in sorted order, the
    /// last key varying fastest).
    pub grid: BTreeMap<String, Vec<serde_json::Value>>,
    /// Paired values: lists of equal length, the i-th values taken together; combined with
    /// the grid as one more axis.
    pub zip: BTreeMap<String, Vec<serde_json::Value>>,
}

/// Where a sweep's points run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LauncherKind {
    /// Processes on this machine, `jobs` at a time.
    Local,
    /// One Slurm job array, one array task per point (`sbatch`).
    Slurm,
}

/// How a sweep's points are launched (`minimind run -j N` and `--launcher` override it).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LauncherSection {
    /// `local` or `slurm`.
    pub kind: LauncherKind,
    /// Local: points run at once (the cores are split between them). Typical: 2.
    pub jobs: usize,
    /// Slurm: the partition (`sbatch --partition`); the cluster's default when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Slurm: the time limit per point (`--time`, such as "02:00:00").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Slurm: CPU cores per point (`--cpus-per-task`).
    pub cpus_per_task: usize,
    /// Slurm: GPUs per point (`--gpus-per-task`); 0 for CPU training.
    pub gpus_per_task: usize,
    /// Slurm: memory per point (`--mem`, such as "16G"); the cluster's default when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Slurm: more `#SBATCH` lines, written as given (such as "--account=ml").
    pub extra_sbatch: Vec<String>,
    /// Slurm: data-parallel ranks per point (`--ntasks`, started by `srun --mpi=pmix`; needs the
    /// `mpi` build). Each has `cpus_per_task` cores (and `gpus_per_task` GPUs); a point's global
    /// batch is batch_size x accumulation_steps x tasks_per_point.
    pub tasks_per_point: usize,
}

impl Default for LauncherSection {
    fn default() -> Self {
        LauncherSection {
            kind: LauncherKind::Local,
            jobs: 1,
            partition: None,
            time: None,
            cpus_per_task: 2,
            gpus_per_task: 0,
            mem: None,
            extra_sbatch: Vec::new(),
            tasks_per_point: 1,
        }
    }
}
