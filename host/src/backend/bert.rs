//! The bert architecture (BERT, MiniLM, sentence-transformers encoders) from a Hugging Face
//! folder: a bidirectional encoder whose last hidden states the component pools into a
//! sentence embedding. One sequence per call, no cache.

use candle_core::{Device, Tensor};

use super::weights::WeightSource;
use super::{BackendModelError, Encoder};

struct Linear {
    /// `(in, out)`: transposed once at load.
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(src: &WeightSource, name: &str, device: &Device) -> Result<Self, BackendModelError> {
        Ok(Self {
            weight_t: src
                .hf_tensor(&format!("{name}.weight"), device)?
                .t()?
                .contiguous()?,
            bias: src.hf_tensor(&format!("{name}.bias"), device)?,
        })
    }

    /// `x`: `(n, in)` → `(n, out)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(src: &WeightSource, name: &str, device: &Device) -> Result<Self, BackendModelError> {
        Ok(Self {
            weight: src.hf_tensor(&format!("{name}.weight"), device)?,
            bias: src.hf_tensor(&format!("{name}.bias"), device)?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, eps)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// BERT weights.
pub struct Bert {
    word: Tensor,
    position: Tensor,
    /// Every input is segment 0: its type embedding row, `(hidden,)`.
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    n_head: usize,
    head_dim: usize,
    eps: f32,
    vocab: usize,
    hidden: usize,
    max_positions: usize,
}

impl Bert {
    /// Loads a bert folder.
    pub fn load(src: &WeightSource, device: &Device) -> Result<Self, BackendModelError> {
        let config = src
            .config()
            .ok_or_else(|| BackendModelError::Invalid("bert needs a Hugging Face folder".into()))?;
        let int = |k: &str| {
            config
                .get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| BackendModelError::MissingMetadata(format!("config.json: {k}")))
        };
        let hidden = int("hidden_size")?;
        let n_head = int("num_attention_heads")?;
        let n_layer = int("num_hidden_layers")?;
        let max_positions = int("max_position_embeddings")?;
        if n_head == 0 || !hidden.is_multiple_of(n_head) {
            return Err(BackendModelError::Invalid(
                "hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
        match config.get("hidden_act").and_then(|v| v.as_str()) {
            None | Some("gelu") => {}
            Some(other) => {
                return Err(BackendModelError::Invalid(format!(
                    "hidden_act '{other}' is not supported for bert (gelu is)"
                )))
            }
        }
        let eps = config
            .get("layer_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-12) as f32;
        // Checkpoints saved from a task model prefix every name with `bert.`.
        let p = if src.has_hf("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let word = src.hf_tensor(&format!("{p}embeddings.word_embeddings.weight"), device)?;
        let position =
            src.hf_tensor(&format!("{p}embeddings.position_embeddings.weight"), device)?;
        let token_type = src
            .hf_tensor(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                device,
            )?
            .get(0)?;
        let embed_norm = LayerNorm::load(src, &format!("{p}embeddings.LayerNorm"), device)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let l = format!("{p}encoder.layer.{i}");
            let lin = |n: &str| Linear::load(src, &format!("{l}.{n}"), device);
            layers.push(Layer {
                query: lin("attention.self.query")?,
                key: lin("attention.self.key")?,
                value: lin("attention.self.value")?,
                attn_out: lin("attention.output.dense")?,
                attn_norm: LayerNorm::load(
                    src,
                    &format!("{l}.attention.output.LayerNorm"),
                    device,
                )?,
                intermediate: lin("intermediate.dense")?,
                output: lin("output.dense")?,
                out_norm: LayerNorm::load(src, &format!("{l}.output.LayerNorm"), device)?,
            });
        }
        let vocab = word.dims()[0];
        Ok(Self {
            word,
            position,
            token_type,
            embed_norm,
            layers,
            n_head,
            head_dim: hidden / n_head,
            eps,
            vocab,
            hidden,
            max_positions,
        })
    }

    /// Self-attention over `x`, `(batch * len, hidden)`: `batch` sequences padded to `len`;
    /// `mask`, `(batch, 1, 1, len)`, is -inf on padding keys.
    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        batch: usize,
        len: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let heads = |t: Tensor| {
            t.reshape((batch, len, self.n_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(l.query.forward(x)?)?;
        let k = heads(l.key.forward(x)?)?;
        let v = heads(l.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * len, self.hidden))?;
        l.attn_out.forward(&y)
    }

    /// The encoder over `batch` sequences of `ids`, `(batch * len)` ids padded to `len`.
    fn run(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let device = self.word.device();
        let ids = Tensor::new(ids, device)?;
        let positions = self.position.narrow(0, 0, len)?.repeat((batch, 1))?;
        let x = self
            .word
            .index_select(&ids, 0)?
            .add(&positions)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.embed_norm.forward(&x, self.eps)?;
        for l in &self.layers {
            let a = self.attention(l, &x, batch, len, mask)?;
            x = l.attn_norm.forward(&(a + &x)?, self.eps)?;
            let h = l.intermediate.forward(&x)?.gelu_erf()?;
            let h = l.output.forward(&h)?;
            x = l.out_norm.forward(&(h + &x)?, self.eps)?;
        }
        Ok(x)
    }
}

impl Encoder for Bert {
    fn encode(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        self.run(tokens, 1, tokens.len(), None)
    }

    /// One pass over all sequences, padded to the longest; padding is masked out of
    /// attention, so each sequence's states are its own.
    fn encode_batch(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<Tensor>> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if seqs.len() < 2 || len == 0 {
            return seqs.iter().map(|s| self.encode(s)).collect();
        }
        let batch = seqs.len();
        let mut ids = Vec::with_capacity(batch * len);
        let mut mask = Vec::with_capacity(batch * len);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.resize(ids.len() + len - s.len(), 0);
            mask.extend((0..len).map(|i| {
                if i < s.len() {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        let mask = Tensor::from_vec(mask, (batch, 1, 1, len), self.word.device())?;
        let x = self.run(&ids, batch, len, Some(&mask))?;
        seqs.iter()
            .enumerate()
            .map(|(i, s)| x.narrow(0, i * len, s.len()))
            .collect()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn hidden_size(&self) -> usize {
        self.hidden
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }
}
