//! Where each named parameter lives in the flat buffers (parameters, gradients, AdamW
//! moments all share this layout), under MiniMind / Hugging Face tensor names.

use std::ops::Range;

use crate::config::ModelConfig;

/// One named tensor: its MiniMind/HF name, shape and place in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// A SwiGLU feed-forward: gate `[I, C]`, up `[I, C]`, down `[C, I]`.
#[derive(Clone, Debug)]
pub struct Ffn {
    pub gate: Range<usize>,
    pub up: Range<usize>,
    pub down: Range<usize>,
}

impl Ffn {
    /// Gate and up together, `[2I, C]`: the layout stores them back to back.
    pub fn gate_up(&self) -> Range<usize> {
        debug_assert_eq!(self.gate.end, self.up.start);
        self.gate.start..self.up.end
    }
}

#[derive(Clone, Debug)]
pub enum Mlp {
    Dense(Ffn),
    Moe { router: Range<usize>, experts: Vec<Ffn>, shared: Vec<Ffn> },
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub ln1: Range<usize>,
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub v: Range<usize>,
    pub o: Range<usize>,
    pub ln2: Range<usize>,
    pub mlp: Mlp,
}

impl Layer {
    /// q, k and v together, `[(H + 2G) D, C]`: the layout stores them back to back.
    pub fn qkv(&self) -> Range<usize> {
        debug_assert!(self.q.end == self.k.start && self.k.end == self.v.start);
        self.q.start..self.v.end
    }
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub tensors: Vec<Tensor>,
    /// `[V, C]`, also the output head (tied).
    pub embed: Range<usize>,
    pub norm: Range<usize>,
    pub layers: Vec<Layer>,
    pub total: usize,
}

struct Builder {
    tensors: Vec<Tensor>,
    next: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: &[usize]) -> Range<usize> {
        let len: usize = shape.iter().product();
        let range = self.next..self.next + len;
        self.next += len;
        self.tensors.push(Tensor { name, shape: shape.to_vec(), range: range.clone() });
        range
    }

    fn ffn(&mut self, prefix: &str, c: usize, i: usize) -> Ffn {
        Ffn {
            gate: self.add(format!("{prefix}.gate_proj.weight"), &[i, c]),
            up: self.add(format!("{prefix}.up_proj.weight"), &[i, c]),
            down: self.add(format!("{prefix}.down_proj.weight"), &[c, i]),
        }
    }
}

impl Layout {
    pub fn new(m: &ModelConfig) -> Layout {
        let (c, i, d) = (m.hidden_size, m.intermediate_size, m.head_dim);
        let mut b = Builder { tensors: Vec::new(), next: 0 };
        let embed = b.add("model.embed_tokens.weight".into(), &[m.vocab_size, c]);
        let mut layers = Vec::with_capacity(m.num_hidden_layers);
        for l in 0..m.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ln1 = b.add(format!("{p}.input_layernorm.weight"), &[c]);
            let q = b.add(format!("{p}.self_attn.q_proj.weight"), &[m.num_attention_heads * d, c]);
            let k = b.add(format!("{p}.self_attn.k_proj.weight"), &[m.num_key_value_heads * d, c]);
            let v = b.add(format!("{p}.self_attn.v_proj.weight"), &[m.num_key_value_heads * d, c]);
            let o = b.add(format!("{p}.self_attn.o_proj.weight"), &[c, m.num_attention_heads * d]);
            let ln2 = b.add(format!("{p}.post_attention_layernorm.weight"), &[c]);
            let mlp = if m.use_moe {
                let router = b.add(format!("{p}.mlp.gate.weight"), &[m.n_routed_experts, c]);
                let experts =
                    (0..m.n_routed_experts).map(|e| b.ffn(&format!("{p}.mlp.experts.{e}"), c, i)).collect();
                let shared = (0..m.n_shared_experts)
                    .map(|s| b.ffn(&format!("{p}.mlp.shared_experts.{s}"), c, i))
                    .collect();
                Mlp::Moe { router, experts, shared }
            } else {
                Mlp::Dense(b.ffn(&format!("{p}.mlp"), c, i))
            };
            layers.push(Layer { ln1, q, k, v, o, ln2, mlp });
        }
        let norm = b.add("model.norm.weight".into(), &[c]);
        Layout { tensors: b.tensors, embed, norm, layers, total: b.next }
    }

    /// Every parameter of layer `l`, one contiguous span. Backward finishes the gradients in
    /// spans: the final norm, each layer's from the last to the first, then the embedding
    /// (the tied head writes it first, the input embedding last); together they tile
    /// `0..total`.
    pub fn layer_span(&self, l: usize) -> Range<usize> {
        let end = self.layers.get(l + 1).map_or(self.norm.start, |next| next.ln1.start);
        self.layers[l].ln1.start..end
    }

    pub fn find(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// True for RMSNorm weights (initialised to one).
    pub fn is_norm(name: &str) -> bool {
        name.ends_with("layernorm.weight") || name == "model.norm.weight"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    pub fn tiny(use_moe: bool) -> ModelConfig {
        ModelConfig {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 6400,
            intermediate_size: 192,
            head_dim: 16,
            rope_theta: 1e6,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 32768,
            use_moe,
            n_routed_experts: 4,
            num_experts_per_tok: 2,
            n_shared_experts: 1,
            aux_loss_alpha: 0.1,
            seq_aux: true,
            norm_topk_prob: true,
        }
    }

    #[test]
    fn total_matches_the_parameter_count() {
        for moe in [false, true] {
            let m = tiny(moe);
            let l = Layout::new(&m);
            assert_eq!(l.total as u64, m.parameter_count());
            assert_eq!(l.tensors.last().unwrap().range.end, l.total);
        }
    }

    #[test]
    fn backward_spans_tile_the_buffer_each_tensor_in_one() {
        for moe in [false, true] {
            let l = Layout::new(&tiny(moe));
            // The spans backward reports, in its order (model.rs: `trunk_backward`).
            let mut spans = vec![l.norm.clone()];
            spans.extend((0..l.layers.len()).rev().map(|i| l.layer_span(i)));
            spans.push(l.embed.clone());
            spans.sort_by_key(|r| r.start);
            assert_eq!(spans[0].start, 0);
            assert!(spans.windows(2).all(|w| w[0].end == w[1].start), "{spans:?}");
            assert_eq!(spans.last().unwrap().end, l.total);
            for t in &l.tensors {
                assert!(spans.iter().any(|s| s.start <= t.range.start && t.range.end <= s.end), "{}", t.name);
            }
        }
    }
}
