//! The pre-norm decoder that llama, qwen2 and qwen3 share (RMSNorm, rotary attention with
//! grouped KV heads, SwiGLU MLP), with tensor names as in llama.cpp (`attn_q`, `ffn_gate`, ...).
//! The families differ by a few switches ([`Family`]); each has its own file that says which.
//! Weights are immutable and shared by every sequence; a sequence's state lives in its
//! [`KvCache`].

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::kv_cache::KvCache;
use super::weights::{Embedding, HParams, WeightSource};
use super::{BackendModelError, CausalLm};

/// What sets one family of the decoder apart.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Q, K and V projections have biases (qwen2).
    pub qkv_bias: bool,
    /// Q and K get an RMS norm per head before rotation (qwen3).
    pub qk_norm: bool,
}

struct Layer {
    attn_norm: Tensor,
    attn_q: QMatMul,
    attn_k: QMatMul,
    attn_v: QMatMul,
    /// Biases of q, k and v, when the family has them.
    qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Per-head RMS norm weights of q and k, when the family has them.
    qk_norm: Option<(Tensor, Tensor)>,
    attn_output: QMatMul,
    ffn_norm: Tensor,
    ffn_gate: QMatMul,
    ffn_up: QMatMul,
    ffn_down: QMatMul,
}

/// Decoder weights.
pub struct Decoder {
    token_embd: Embedding,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: QMatMul,
    /// Rotary tables sized to the configured context, `(context, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
    /// Q and K rows are permuted for GPT-J style rotation (llama GGUF files).
    interleaved: bool,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    vocab: usize,
    device: Device,
}

/// Loads `arch`'s hyper-parameters and a decoder of `family` over them; the context is the
/// model's own, capped by `context`. Returns the decoder and that context.
pub fn load_family(
    src: &mut WeightSource,
    arch: &str,
    family: Family,
    context: Option<usize>,
    device: &Device,
) -> Result<(Decoder, usize), BackendModelError> {
    let hp = src.hparams(arch)?;
    let context = context
        .map_or(hp.context_length, |c| c.min(hp.context_length))
        .max(1);
    Ok((
        Decoder::load(src, arch, family, &hp, context, device)?,
        context,
    ))
}

impl Decoder {
    /// Loads a decoder of `family` for a context of `context` positions.
    pub fn load(
        src: &mut WeightSource,
        arch: &str,
        family: Family,
        hp: &HParams,
        context: usize,
        device: &Device,
    ) -> Result<Self, BackendModelError> {
        let (cos, sin) = rope_tables(hp.head_dim, hp.rope_base, context, device)?;
        let token_embd = src.tensor("token_embd.weight", device)?.embedding();
        let (vocab, embd_width) = token_embd.dims();
        if embd_width != hp.hidden || vocab == 0 {
            return Err(BackendModelError::Invalid(format!(
                "token_embd is {vocab}x{embd_width}, expected a width of {}",
                hp.hidden
            )));
        }
        let output = match src.optional("output.weight", device)? {
            Some(t) => t.matmul()?,
            // Tied embeddings: the output projection shares the embedding table.
            None => token_embd.as_matmul()?,
        };
        let output_norm = src.tensor("output_norm.weight", device)?.dense(device)?;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let p = format!("blk.{i}");
            let mut dense = |n: &str| src.tensor(&format!("{p}.{n}"), device)?.dense(device);
            let qkv_bias = if family.qkv_bias {
                Some((
                    dense("attn_q.bias")?,
                    dense("attn_k.bias")?,
                    dense("attn_v.bias")?,
                ))
            } else {
                None
            };
            let qk_norm = if family.qk_norm {
                Some((dense("attn_q_norm.weight")?, dense("attn_k_norm.weight")?))
            } else {
                None
            };
            let attn_norm = dense("attn_norm.weight")?;
            let ffn_norm = dense("ffn_norm.weight")?;
            let mut matmul = |n: &str| src.tensor(&format!("{p}.{n}"), device)?.matmul();
            layers.push(Layer {
                attn_norm,
                attn_q: matmul("attn_q.weight")?,
                attn_k: matmul("attn_k.weight")?,
                attn_v: matmul("attn_v.weight")?,
                qkv_bias,
                qk_norm,
                attn_output: matmul("attn_output.weight")?,
                ffn_norm,
                ffn_gate: matmul("ffn_gate.weight")?,
                ffn_up: matmul("ffn_up.weight")?,
                ffn_down: matmul("ffn_down.weight")?,
            });
        }
        Ok(Self {
            token_embd,
            layers,
            output_norm,
            output,
            cos,
            sin,
            interleaved: src.interleaved_rope(arch),
            n_head: hp.n_head,
            n_kv_head: hp.n_kv_head,
            head_dim: hp.head_dim,
            eps: hp.eps,
            vocab,
            device: device.clone(),
        })
    }

    /// Embedding rows of `tokens`, `(1, n, hidden)`.
    fn embed(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        self.token_embd.lookup(tokens, &self.device)
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
        let mut q = heads(q, self.n_head)?;
        let mut k = heads(k, self.n_kv_head)?;
        let v = heads(v, self.n_kv_head)?;
        if let Some((qn, kn)) = &self.layers[layer].qk_norm {
            q = candle_nn::ops::rms_norm(&q, qn, self.eps)?;
            k = candle_nn::ops::rms_norm(&k, kn, self.eps)?;
        }
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        let rope = if self.interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
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
        y.transpose(1, 2)?
            .reshape((b, n, self.n_head * self.head_dim))
    }

    /// The q, k and v projections of `x`, biases added.
    fn qkv(&self, layer: usize, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let l = &self.layers[layer];
        let q = l.attn_q.forward(x)?;
        let k = l.attn_k.forward(x)?;
        let v = l.attn_v.forward(x)?;
        match &l.qkv_bias {
            Some((bq, bk, bv)) => Ok((
                q.broadcast_add(bq)?,
                k.broadcast_add(bk)?,
                v.broadcast_add(bv)?,
            )),
            None => Ok((q, k, v)),
        }
    }

    fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        pos: usize,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(layer, x)?;
        let y = self.attend(layer, &q, &k, &v, pos, cache)?;
        self.layers[layer].attn_output.forward(&y)
    }

    /// Attention of `caches.len()` sequences with one new token each: `x` is `(1, batch,
    /// hidden)`; the projections run as one batched product, attention per sequence.
    fn attention_batch(
        &self,
        layer: usize,
        x: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(layer, x)?;
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
        self.layers[layer]
            .attn_output
            .forward(&Tensor::cat(&ys, 1)?)
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let gate = candle_nn::ops::silu(&l.ffn_gate.forward(x)?)?;
        l.ffn_down.forward(&(gate * l.ffn_up.forward(x)?)?)
    }
}

impl CausalLm for Decoder {
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
