//! The pre-norm decoder that llama, qwen2, qwen3 and gemma3 share (RMSNorm, rotary attention
//! with grouped KV heads, gated MLP), with tensor names as in llama.cpp (`attn_q`, `ffn_gate`,
//! ...).
//! The families differ by a few switches ([`Family`]); each has its own file that says which.
//! Weights are immutable and shared by every sequence; a sequence's state lives in its
//! [`KvCache`].

use candle_core::{DType, Device, Tensor};

mod rows;

use super::kv_cache::{KvCache, KvDType};
use super::linear::{Linear, Stacked};
use super::weights::{Embedding, HParams, WeightSource};
use super::{BackendModelError, CausalLm, LoadOptions, Pass};

/// What sets one family of the decoder apart.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Q, K and V projections have biases (qwen2).
    pub qkv_bias: bool,
    /// Q and K get an RMS norm per head before rotation (qwen3, gemma3).
    pub qk_norm: bool,
    /// Embeddings are multiplied by √hidden (gemma).
    pub embed_scale: bool,
    /// Attention and MLP outputs are normed again before the residual add (gemma2/3:
    /// `post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Local layers attend over a sliding window, with a rotary base of their own.
    pub sliding: Option<Sliding>,
}

impl Family {
    /// Llama's decoder, which the others change.
    pub const LLAMA: Family = Family {
        qkv_bias: false,
        qk_norm: false,
        embed_scale: false,
        post_norms: false,
        activation: Activation::Silu,
        sliding: None,
    };
}

/// The gate activation of the MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (llama, qwen).
    Silu,
    /// GELU, tanh approximation (gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Interleaved local (sliding-window) and global layers.
#[derive(Debug, Clone, Copy)]
pub struct Sliding {
    /// Every `every`-th layer is global, the others local (gemma3: 6).
    pub every: usize,
    /// Rotary base of the local layers (the GGUF's `rope.freq_base` is the global layers').
    pub rope_base: f32,
}

struct Layer {
    attn_norm: Tensor,
    /// The q, k and v projections.
    qkv: Stacked,
    /// Biases of q, k and v, when the family has them.
    qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Per-head RMS norm weights of q and k, when the family has them.
    qk_norm: Option<(Tensor, Tensor)>,
    attn_output: Linear,
    /// Norm of the attention output before the residual add, when the family has it.
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// The gate and up projections.
    gate_up: Stacked,
    ffn_down: Linear,
    /// Norm of the MLP output before the residual add, when the family has it.
    post_ffn_norm: Option<Tensor>,
    /// Keys a sliding-window layer sees (its own position included); `None`: all.
    window: Option<usize>,
    /// Which rotary tables the layer uses: 0 global, 1 local.
    rope: usize,
}

/// Decoder weights.
pub struct Decoder {
    token_embd: Embedding,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Linear,
    /// Rotary `(cos, sin)` tables sized to the configured context, `(context, head_dim / 2)`:
    /// the global layers', then the local layers' when they differ.
    ropes: Vec<(Tensor, Tensor)>,
    /// Q and K rows are permuted for GPT-J style rotation (llama GGUF files).
    interleaved: bool,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// What attention scores are multiplied by.
    attn_scale: f64,
    /// What embeddings are multiplied by.
    embed_scale: Option<f64>,
    activation: Activation,
    context: usize,
    eps: f32,
    vocab: usize,
    device: Device,
    /// The CPU pass over plain rows; `None`: the tensor pass.
    rows: Option<rows::RowWeights>,
    /// The element type of the CPU pass's KV cache.
    kv_dtype: KvDType,
}

/// Loads `arch`'s hyper-parameters and a decoder of `family` over them; the context is the
/// model's own, capped by the options'. Returns the decoder and that context.
pub fn load_family(
    src: &mut WeightSource,
    arch: &str,
    family: Family,
    options: &LoadOptions,
    device: &Device,
) -> Result<(Decoder, usize), BackendModelError> {
    let hp = src.hparams(arch)?;
    let context = options
        .context
        .map_or(hp.context_length, |c| c.min(hp.context_length))
        .max(1);
    Ok((
        Decoder::load(src, arch, family, &hp, context, options, device)?,
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
        options: &LoadOptions,
        device: &Device,
    ) -> Result<Self, BackendModelError> {
        let mut ropes = vec![rope_tables(
            hp.head_dim,
            hp.rope_base,
            hp.rope_scale,
            context,
            device,
        )?];
        let window = match family.sliding {
            Some(sliding) => {
                let window = hp.sliding_window.ok_or_else(|| {
                    BackendModelError::MissingMetadata(format!("{arch}.attention.sliding_window"))
                })?;
                ropes.push(rope_tables(
                    hp.head_dim,
                    sliding.rope_base,
                    1.0,
                    context,
                    device,
                )?);
                Some((window, sliding.every.max(1)))
            }
            None => None,
        };
        let token_embd = src.tensor("token_embd.weight", device)?.embedding()?;
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
            let (post_attn_norm, post_ffn_norm) = if family.post_norms {
                (
                    Some(dense("post_attention_norm.weight")?),
                    Some(dense("post_ffw_norm.weight")?),
                )
            } else {
                (None, None)
            };
            // As llama.cpp: layer i is local unless i % every == every - 1.
            let local = window.filter(|&(_, every)| i % every < every - 1);
            let mut stacked = |names: &[&str]| {
                let names: Vec<String> = names.iter().map(|n| format!("{p}.{n}.weight")).collect();
                src.stacked(&names, device)
            };
            let qkv = stacked(&["attn_q", "attn_k", "attn_v"])?;
            let gate_up = stacked(&["ffn_gate", "ffn_up"])?;
            let mut matmul = |n: &str| src.tensor(&format!("{p}.{n}"), device)?.matmul();
            layers.push(Layer {
                attn_norm,
                qkv,
                qkv_bias,
                qk_norm,
                attn_output: matmul("attn_output.weight")?,
                post_attn_norm,
                ffn_norm,
                gate_up,
                ffn_down: matmul("ffn_down.weight")?,
                post_ffn_norm,
                window: local.map(|(w, _)| w),
                rope: usize::from(local.is_some()),
            });
        }
        // Gemma 3 27B scales by its hidden size per head, not its head size (llama.cpp,
        // after gemma_pytorch's config); 62 layers is how llama.cpp recognises it.
        let attn_scale = if family.embed_scale && hp.n_layer == 62 {
            1.0 / ((hp.hidden / hp.n_head) as f64).sqrt()
        } else {
            1.0 / (hp.head_dim as f64).sqrt()
        };
        let mut decoder = Self {
            token_embd,
            layers,
            output_norm,
            output,
            ropes,
            interleaved: src.interleaved_rope(arch),
            n_head: hp.n_head,
            n_kv_head: hp.n_kv_head,
            head_dim: hp.head_dim,
            attn_scale,
            embed_scale: family.embed_scale.then(|| (hp.hidden as f64).sqrt()),
            activation: family.activation,
            context,
            eps: hp.eps,
            vocab,
            device: device.clone(),
            rows: None,
            kv_dtype: options.kv,
        };
        if device.is_cpu() && options.pass == Pass::Auto {
            decoder.rows = Some(rows::RowWeights::of(&decoder)?);
        }
        if options.kv == KvDType::Q8_0 {
            // Said at load, not at the first request: the tensor pass keeps its own cache.
            if decoder.rows.is_none() {
                return Err(BackendModelError::KvCache(format!(
                    "q8_0 is for the CPU pass only, not {device:?}"
                )));
            }
            if !hp.head_dim.is_multiple_of(32) {
                return Err(BackendModelError::KvCache(format!(
                    "q8_0 needs heads of a multiple of 32 values, not {}",
                    hp.head_dim
                )));
            }
        }
        Ok(decoder)
    }

    /// Embedding rows of `tokens`, `(1, n, hidden)`.
    fn embed(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let x = self.token_embd.lookup(tokens, &self.device)?;
        match self.embed_scale {
            Some(s) => x * s,
            None => Ok(x),
        }
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
        let (cos, sin) = &self.ropes[self.layers[layer].rope];
        let cos = cos.narrow(0, pos, n)?;
        let sin = sin.narrow(0, pos, n)?;
        let rope = if self.interleaved {
            candle_nn::rotary_emb::rope_i
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        let (mut k, mut v) = cache.append(layer, &k, &v)?;
        // A sliding-window layer reads only the keys its first query can still see.
        let window = self.layers[layer].window;
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        if first > 0 {
            let keep = pos + n - first;
            k = k.narrow(2, first, keep)?.contiguous()?;
            v = v.narrow(2, first, keep)?.contiguous()?;
        }
        // Grouped-query attention without copying K and V per query head: the `group` query
        // heads of one KV head become `group * n` rows of one matrix product.
        let group = self.n_head / self.n_kv_head;
        let total = k.dim(2)?;
        let q = q.reshape((b, self.n_kv_head, group * n, self.head_dim))?;
        let mut att = (q.matmul(&k.t()?)? * self.attn_scale)?;
        if n > 1 {
            att = att
                .reshape((b, self.n_kv_head, group, n, total))?
                .broadcast_add(&attention_mask(n, pos, first, window, &self.device)?)?
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
        let [q, k, v] = outputs(l.qkv.forward(x)?)?;
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
        let [gate, up] = outputs(l.gate_up.forward(x)?)?;
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        l.ffn_down.forward(&(gate * up)?)
    }

    /// One block: `x + attn(norm(x))`, then `+ mlp(norm(..))`, each output normed again first
    /// when the family says so.
    fn block(
        &self,
        layer: usize,
        x: Tensor,
        attention: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let norm = |t: &Tensor, w: &Tensor| candle_nn::ops::rms_norm(t, w, self.eps);
        let mut a = attention(&norm(&x, &l.attn_norm)?)?;
        if let Some(w) = &l.post_attn_norm {
            a = norm(&a, w)?;
        }
        let x = (x + a)?;
        let mut m = self.mlp(layer, &norm(&x, &l.ffn_norm)?)?;
        if let Some(w) = &l.post_ffn_norm {
            m = norm(&m, w)?;
        }
        x + m
    }
}

impl CausalLm for Decoder {
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        if let Some(w) = &self.rows {
            return self.rows_forward(w, tokens, cache);
        }
        // On candle's own pool: its many small parallel ops then run on warm workers instead
        // of handing each one to a sleeping thread (a futex wake per op).
        self.device
            .with_context(|| self.forward_here(tokens, cache))
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if let Some(w) = &self.rows {
            return self.rows_forward_batch(w, tokens, caches);
        }
        self.device
            .with_context(|| self.forward_batch_here(tokens, caches))
    }

    fn new_cache(&self, max_len: usize) -> KvCache {
        let max_len = max_len.min(self.context);
        match self.rows {
            Some(_) => {
                let row = self.n_kv_head * self.head_dim;
                KvCache::new_rows(self.layers.len(), max_len, row, self.kv_dtype)
            }
            None => KvCache::new(self.layers.len(), max_len),
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

impl Decoder {
    fn forward_here(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        let pos = cache.len();
        let n = tokens.len();
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            x = self.block(i, x, |h| self.attention(i, h, pos, cache))?;
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

    fn forward_batch_here(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            x = self.block(i, x, |h| self.attention_batch(i, h, caches))?;
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
}

/// The outputs of a [`Stacked`] of `N` matrices.
pub(super) fn outputs<T, const N: usize>(parts: Vec<T>) -> candle_core::Result<[T; N]> {
    let n = parts.len();
    parts
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{n} products where {N} were stacked")))
}

/// `(n, pos + n - first)` for queries at `pos..pos + n` and keys from position `first` on: 0
/// where the query may see the key (not after it, and within `window` when there is one),
/// -inf elsewhere.
fn attention_mask(
    n: usize,
    pos: usize,
    first: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = pos + n - first;
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            let query = pos + i;
            (first..first + total).map(move |key| {
                if key > query || query - key >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

/// Rotary `(cos, sin)` for positions `0..context`, each position multiplied by `scale`.
fn rope_tables(
    head_dim: usize,
    base: f32,
    scale: f32,
    context: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
    let positions = (Tensor::arange(0u32, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?
        * f64::from(scale))?;
    let angles = positions.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
