//! Sentence embeddings as sentence-transformers computes them: the model's tokenizer with its
//! special tokens, truncation to `max_seq_length`, the encoder's hidden states (over wasi-nn),
//! then the pooling of `1_Pooling/config.json` and the `Normalize` module when listed.

use serde_json::Value;

use crate::metadata::ModelMetadata;

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    /// Mean times the square root of the length.
    MeanSqrtLen,
}

/// How one model embeds.
#[derive(Debug, Clone)]
pub struct EmbeddingSpec {
    pub pooling: Pooling,
    pub normalize: bool,
    /// Most tokens of one input, special tokens included.
    pub max_tokens: usize,
}

impl EmbeddingSpec {
    /// The spec of an embedding model: sentence-transformers' files when the folder has them,
    /// else mean pooling and L2 normalization (what most embedding models expect).
    pub fn from_metadata(meta: &ModelMetadata) -> Self {
        let st = meta.sentence_transformers.as_ref();
        let pooling_cfg = st.and_then(|s| s.get("pooling"));
        let flag = |k: &str| {
            pooling_cfg
                .and_then(|p| p.get(k))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let pooling = if flag("pooling_mode_cls_token") {
            Pooling::Cls
        } else if flag("pooling_mode_max_tokens") {
            Pooling::Max
        } else if flag("pooling_mode_mean_sqrt_len_tokens") {
            Pooling::MeanSqrtLen
        } else {
            Pooling::Mean
        };
        let normalize = match st.and_then(|s| s.get("modules")).and_then(Value::as_array) {
            Some(modules) => modules.iter().any(|m| {
                m.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with(".Normalize"))
            }),
            None => true,
        };
        let max_seq = st
            .and_then(|s| s.get("config"))
            .and_then(|c| c.get("max_seq_length"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let context = meta.context_length as usize;
        Self {
            pooling,
            normalize,
            max_tokens: max_seq.map_or(context, |m| m.min(context)).max(2),
        }
    }

    /// One vector from `states`, `n` rows of `hidden` values.
    pub fn pool(&self, states: &[f32], hidden: usize) -> Vec<f32> {
        let n = states.len() / hidden.max(1);
        let rows = states.chunks_exact(hidden);
        let mut v = match self.pooling {
            Pooling::Cls => states[..hidden.min(states.len())].to_vec(),
            Pooling::Max => rows.fold(vec![f32::NEG_INFINITY; hidden], |mut acc, r| {
                for (a, x) in acc.iter_mut().zip(r) {
                    *a = a.max(*x);
                }
                acc
            }),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut acc = vec![0.0f32; hidden];
                for r in rows {
                    for (a, x) in acc.iter_mut().zip(r) {
                        *a += x;
                    }
                }
                let div = match self.pooling {
                    Pooling::Mean => n as f32,
                    _ => (n as f32).sqrt(),
                };
                acc.iter_mut().for_each(|a| *a /= div.max(1.0));
                acc
            }
        };
        if self.normalize {
            // sentence-transformers: x / max(||x||, 1e-12).
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_normalizes() {
        let spec = EmbeddingSpec {
            pooling: Pooling::Mean,
            normalize: true,
            max_tokens: 8,
        };
        let v = spec.pool(&[1.0, 0.0, 3.0, 0.0], 2);
        assert_eq!(v, vec![1.0, 0.0]);
        let spec = EmbeddingSpec {
            pooling: Pooling::Max,
            normalize: false,
            max_tokens: 8,
        };
        assert_eq!(spec.pool(&[1.0, 5.0, 3.0, -1.0], 2), vec![3.0, 5.0]);
    }
}
