//! MiniMind's tokenizer (a Hugging Face `tokenizer.json`) and its special tokens.

use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// A loaded tokenizer with the ids MiniMind's encoding needs.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    /// `<|im_start|>`: starts every row.
    pub bos: u32,
    /// `<|im_end|>`: ends every document.
    pub eos: u32,
    /// `<|endoftext|>`: fills rows to T; never a target.
    pub pad: u32,
    /// One past the largest id the tokenizer can emit (ids need not be dense): the model's
    /// vocabulary must cover it, and it decides the token cache's width.
    pub id_limit: usize,
}

impl Tok {
    pub fn load(path: &Path) -> Result<Tok> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| anyhow!("tokenizer {} has no {t} token", path.display()))
        };
        let id_limit = inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        Ok(Tok {
            bos: id("<|im_start|>")?,
            eos: id("<|im_end|>")?,
            pad: id("<|endoftext|>")?,
            id_limit,
            inner,
        })
    }

    /// Token ids of a text, without special tokens added (as MiniMind calls it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }
}

/// MiniMind's row: `[bos] + tokens[:T-2] + [eos]`, padded with `pad` to T. Returns the ids
/// and the targets (`targets[t]` = `ids[t+1]`, -1 where that is pad or past the end).
pub fn encode_row(
    tokens: &[u32],
    t: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    ids: &mut [u32],
    targets: &mut [i32],
) {
    let body = tokens.len().min(t - 2);
    ids[0] = bos;
    ids[1..1 + body].copy_from_slice(&tokens[..body]);
    ids[1 + body] = eos;
    ids[2 + body..t].fill(pad);
    targets_from_ids(ids, pad, targets);
}

/// Next-token targets of one row; pad targets and the last position are ignored (-1).
pub fn targets_from_ids(ids: &[u32], pad: u32, targets: &mut [i32]) {
    let t = ids.len();
    for i in 0..t {
        targets[i] = if i + 1 < t && ids[i + 1] != pad { ids[i + 1] as i32 } else { -1 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_table() {
        let (mut ids, mut tg) = (vec![0; 6], vec![0; 6]);
        encode_row(&[7, 8], 6, 1, 2, 0, &mut ids, &mut tg);
        assert_eq!(ids, [1, 7, 8, 2, 0, 0]);
        assert_eq!(tg, [7, 8, 2, -1, -1, -1]);
        encode_row(&[7, 8, 9, 10, 11], 6, 1, 2, 0, &mut ids, &mut tg);
        assert_eq!(ids, [1, 7, 8, 9, 10, 2]);
        assert_eq!(tg, [7, 8, 9, 10, 2, -1]);
        encode_row(&[], 6, 1, 2, 0, &mut ids, &mut tg);
        assert_eq!(ids, [1, 2, 0, 0, 0, 0]);
        assert_eq!(tg, [2, -1, -1, -1, -1, -1]);
    }
}
