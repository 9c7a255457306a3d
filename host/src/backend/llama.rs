//! The llama architecture (SmolLM2, Llama 2/3, Mistral, ...) from GGUF, with names as in
//! llama.cpp's tensor naming (`attn_q`, `ffn_gate`, ...). Weights are immutable and shared by
//! every sequence; a sequence's state lives in its [`KvCache`].

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::kv_cache::KvCache;
use super::{BackendModelError, CausalLm};
use crate::gguf::GgufFile;

struct Layer {
    attn_norm: Tensor,
    attn_q: QMatMul,
    attn_k: QMatMul,
    attn_v: QMatMul,
    attn_output: QMatMul,
    ffn_norm: Tensor,
    ffn_gate: QMatMul,
    ffn_up: QMatMul,
    ffn_down: QMatMul,
}

/// Llama weights.
pub struct Llama {
    /// Token embeddings stay quantized; rows are dequantized on lookup (f32 would cost
    /// 4-8x the file's size for large vocabularies).
    token_embd: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: QMatMul,
    /// Rotary tables sized to the configured context, `(context, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    eps: f32,
    vocab: usize,
    device: Device,
}

impl Llama {
    /// Loads a llama-architecture GGUF for a context of `context` positions.
    pub fn load(
        f: &mut GgufFile,
        context: usize,
        device: &Device,
    ) -> Result<Self, BackendModelError> {
        let arch = f.architecture().unwrap_or_else(|| "llama".into());
        let need = |k: &str| {
            f.get_u32(&format!("{arch}.{k}"))
                .ok_or_else(|| BackendModelError::MissingMetadata(format!("{arch}.{k}")))
        };
        let n_head = need("attention.head_count")? as usize;
        let n_kv_head = f
            .get_u32(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(n_head as u32) as usize;
        let n_layer = need("block_count")? as usize;
        let hidden = need("embedding_length")? as usize;
        if n_head == 0
            || n_kv_head == 0
            || !hidden.is_multiple_of(n_head)
            || !n_head.is_multiple_of(n_kv_head)
        {
            return Err(BackendModelError::Invalid(
                "inconsistent attention head counts".into(),
            ));
        }
        let head_dim = hidden / n_head;
        let rope_dim = f
            .get_u32(&format!("{arch}.rope.dimension_count"))
            .unwrap_or(head_dim as u32) as usize;
        if rope_dim != head_dim {
            return Err(BackendModelError::Invalid(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            )));
        }
        let eps = f
            .get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5);
        let freq_base = f
            .get_f32(&format!("{arch}.rope.freq_base"))
            .unwrap_or(10_000.0);
        let (cos, sin) = rope_tables(head_dim, freq_base, context, device)?;

        let mut tensor = |name: &str| -> Result<QTensor, BackendModelError> {
            f.content
                .tensor(&mut f.reader, name, device)
                .map_err(|e| BackendModelError::Tensor(name.to_string(), super::plain_message(&e)))
        };
        let dense = |q: QTensor| q.dequantize(device).map_err(BackendModelError::from);
        let matmul = |q: QTensor| QMatMul::from_qtensor(q).map_err(BackendModelError::from);

        let token_embd = Arc::new(tensor("token_embd.weight")?);
        let output = match tensor("output.weight") {
            Ok(t) => matmul(t)?,
            // Tied embeddings: the output projection shares the embedding table.
            Err(_) => QMatMul::from_arc(token_embd.clone())?,
        };
        let output_norm = dense(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: dense(tensor(&format!("{p}.attn_norm.weight"))?)?,
                attn_q: matmul(tensor(&format!("{p}.attn_q.weight"))?)?,
                attn_k: matmul(tensor(&format!("{p}.attn_k.weight"))?)?,
                attn_v: matmul(tensor(&format!("{p}.attn_v.weight"))?)?,
                attn_output: matmul(tensor(&format!("{p}.attn_output.weight"))?)?,
                ffn_norm: dense(tensor(&format!("{p}.ffn_norm.weight"))?)?,
                ffn_gate: matmul(tensor(&format!("{p}.ffn_gate.weight"))?)?,
                ffn_up: matmul(tensor(&format!("{p}.ffn_up.weight"))?)?,
                ffn_down: matmul(tensor(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        let vocab = token_embd.shape().dims()[0];
        Ok(Self {
            token_embd,
            layers,
            output_norm,
            output,
            cos,
            sin,
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            eps,
            vocab,
            device: device.clone(),
        })
    }

    /// Embedding rows of `tokens`, `(1, n, hidden)`.
    fn embed(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let dtype = self.token_embd.dtype();
        let row_bytes = self.hidden / dtype.block_size() * dtype.type_size();
        let data = self.token_embd.data()?;
        let rows = tokens
            .iter()
            .map(|&t| {
                let start = t as usize * row_bytes;
                let raw = data.get(start..start + row_bytes).ok_or_else(|| {
                    candle_core::Error::Msg(format!("token {t} outside the vocabulary"))
                })?;
                qtensor_from_ggml(dtype, raw, vec![1, self.hidden], &Device::Cpu)?
                    .dequantize(&Device::Cpu)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)?.to_device(&self.device)?.unsqueeze(0)
    }

    /// Attention of one sequence from its projected `q`, `k`, `v` (each `(1, n, heads *
    /// head_dim)`), its first position `pos` and its cache; `(1, n, hidden)` before the output
    /// projection.
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = q.dims3()?;
        let heads = |t: &Tensor, h: usize| {
            t.reshape((b, n, h, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(q, self.n_head)?;
        let k = heads(k, self.n_kv_head)?;
        let v = heads(v, self.n_kv_head)?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        // GGUF llama weights are permuted for interleaved (GPT-J style) rotation.
        let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        // Grouped-query attention without copying K and V per query head: the `group` query
        // heads of one KV head become `group * n` rows of one matrix product.
        let group = self.n_head / self.n_kv_head;
        let total = k.dim(2)?;
        let q = q.reshape((b, self.n_kv_head, group * n, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if n > 1 {
            att = att
                .reshape((b, self.n_kv_head, group, n, total))?
                .broadcast_add(&causal_mask(n, pos, &self.device)?)?
                .reshape((b, self.n_kv_head, group * n, total))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .reshape((b, self.n_head, n, self.head_dim))?;
        y.transpose(1, 2)?.reshape((b, n, self.hidden))
    }

    fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        pos: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let q = l.attn_q.forward(x)?;
        let k = l.attn_k.forward(x)?;
        let v = l.attn_v.forward(x)?;
        let y = self.attend(layer, &q, &k, &v, pos, cache)?;
        l.attn_output.forward(&y)
    }

    /// Attention of `caches.len()` sequences with one new token each: `x` is `(1, batch,
    /// hidden)`; the projections run as one batched product, attention per sequence.
    fn attention_batch(
        &self,
        layer: usize,
        x: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let q = l.attn_q.forward(x)?;
        let k = l.attn_k.forward(x)?;
        let v = l.attn_v.forward(x)?;
        let ys = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| {
                let pos = cache.len();
                self.attend(
                    layer,
                    &q.narrow(1, i, 1)?,
                    &k.narrow(1, i, 1)?,
                    &v.narrow(1, i, 1)?,
                    pos,
                    cache,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        l.attn_output.forward(&Tensor::cat(&ys, 1)?)
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let gate = candle_nn::ops::silu(&l.ffn_gate.forward(x)?)?;
        l.ffn_down.forward(&(gate * l.ffn_up.forward(x)?)?)
    }
}

impl CausalLm for Llama {
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        let pos = cache.len();
        let n = tokens.len();
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            let h = candle_nn::ops::rms_norm(&x, &self.layers[i].attn_norm, self.eps)?;
            x = (x + self.attention(i, &h, pos, cache)?)?;
            let h = candle_nn::ops::rms_norm(&x, &self.layers[i].ffn_norm, self.eps)?;
            x = (x + self.mlp(i, &h)?)?;
        }
        cache.advance(n);
        let last = x.narrow(1, n - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.output_norm, self.eps)?;
        self.output
            .forward(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            let h = candle_nn::ops::rms_norm(&x, &self.layers[i].attn_norm, self.eps)?;
            x = (x + self.attention_batch(i, &h, caches)?)?;
            let h = candle_nn::ops::rms_norm(&x, &self.layers[i].ffn_norm, self.eps)?;
            x = (x + self.mlp(i, &h)?)?;
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, self.eps)?;
        self.output
            .forward(&x)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec2()
    }

    fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.layers.len(), max_len.min(self.cos.dims()[0]))
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// `(n, pos + n)`: 0 where query i may see key j, -inf after it.
fn causal_mask(n: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = pos + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

fn rope_tables(
    head_dim: usize,
    base: f32,
    context: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
    let positions = Tensor::arange(0u32, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?;
    let angles = positions.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
