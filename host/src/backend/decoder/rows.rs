//! The decoder's forward pass on the CPU over plain f32 rows, for every family the tensor
//! pass serves: products through `Linear::rows`, everything else through
//! `wasmlm_kernels::ops`, the KV cache as f16, f32 or q8_0 rows ([`KvCache::new_rows`]). The
//! tensor pass stays for other devices (and `WASMLM_FORWARD=tensors`, to compare).

use candle_core::{Device, Tensor};
use wasmlm_kernels::ops::{self, AttentionSeq, Heads};

use super::{Activation, Decoder};
use crate::backend::kv_cache::{KvCache, KvRows, KvView};

/// Per-layer vectors of the row pass (the products are the decoder's own).
pub(super) struct RowLayer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    qkv_bias: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

/// What the row pass needs beyond the decoder's products.
pub(super) struct RowWeights {
    layers: Vec<RowLayer>,
    output_norm: Vec<f32>,
    /// `(cos, sin)` per rotary table, `context × head_dim / 2` each.
    ropes: Vec<(Vec<f32>, Vec<f32>)>,
}

fn vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl RowWeights {
    /// The vectors of `d`'s tensors.
    pub(super) fn of(d: &Decoder) -> candle_core::Result<Self> {
        let opt = |t: &Option<Tensor>| t.as_ref().map(vec).transpose();
        let layers = d
            .layers
            .iter()
            .map(|l| {
                Ok(RowLayer {
                    attn_norm: vec(&l.attn_norm)?,
                    ffn_norm: vec(&l.ffn_norm)?,
                    post_attn_norm: opt(&l.post_attn_norm)?,
                    post_ffn_norm: opt(&l.post_ffn_norm)?,
                    qk_norm: match &l.qk_norm {
                        Some((q, k)) => Some((vec(q)?, vec(k)?)),
                        None => None,
                    },
                    qkv_bias: match &l.qkv_bias {
                        Some((q, k, v)) => Some((vec(q)?, vec(k)?, vec(v)?)),
                        None => None,
                    },
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let ropes = d
            .ropes
            .iter()
            .map(|(c, s)| Ok((vec(c)?, vec(s)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            output_norm: vec(&d.output_norm)?,
            ropes,
        })
    }
}

/// One sequence's attention inputs over its cache's keys and values.
fn seq<'a, T>(
    q: &'a [f32],
    k: KvView<'a, T>,
    v: KvView<'a, T>,
    pos: usize,
    out: &'a mut [f32],
) -> AttentionSeq<'a, T> {
    AttentionSeq {
        q,
        k: k.values,
        v: v.values,
        k_scales: k.scales,
        v_scales: v.scales,
        pos,
        out,
    }
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        ops::add(row, bias);
    }
}

impl Decoder {
    /// Runs `tokens` through every layer: sequence `s` of `caches` owns rows
    /// `s * per_seq .. (s + 1) * per_seq`, at the positions after what its cache holds.
    /// Returns the final hidden rows, output-normed, and advances the caches.
    pub(super) fn rows_pass(
        &self,
        w: &RowWeights,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        per_seq: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let n = tokens.len();
        if n != caches.len() * per_seq || n == 0 {
            candle_core::bail!("{n} tokens for {} sequences of {per_seq}", caches.len());
        }
        for c in caches.iter() {
            if c.len() + per_seq > c.max_len() {
                candle_core::bail!(
                    "KV cache full: {} positions > {}",
                    c.len() + per_seq,
                    c.max_len()
                );
            }
        }
        let heads = Heads {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        };
        let (qw, kw) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let mut x = vec(&self.token_embd.lookup(tokens, &Device::Cpu)?)?;
        let hidden = x.len() / n;
        if let Some(s) = self.embed_scale {
            x.iter_mut().for_each(|v| *v *= s as f32);
        }
        let mut h = vec![0f32; n * hidden];
        let mut att = vec![0f32; n * qw];
        let err = |e: wasmlm_kernels::KernelError| candle_core::Error::Msg(e.to_string());
        for (i, (l, rl)) in self.layers.iter().zip(&w.layers).enumerate() {
            ops::rms_norm_into(&x, &rl.attn_norm, self.eps, &mut h);
            let [mut q, mut k, mut v] = super::outputs(l.qkv.rows(&h, n)?)?;
            if let Some((bq, bk, bv)) = &rl.qkv_bias {
                add_bias(&mut q, bq);
                add_bias(&mut k, bk);
                add_bias(&mut v, bv);
            }
            if let Some((qn, kn)) = &rl.qk_norm {
                ops::rms_norm(&mut q, qn, self.eps);
                ops::rms_norm(&mut k, kn, self.eps);
            }
            let (cos, sin) = &w.ropes[l.rope];
            let (qs, ks) = (
                q.chunks_exact_mut(per_seq * qw),
                k.chunks_exact_mut(per_seq * kw),
            );
            for ((qs, ks), cache) in qs.zip(ks).zip(caches.iter()) {
                let pos = cache.len();
                ops::rope(qs, qw, self.head_dim, pos, cos, sin, self.interleaved);
                ops::rope(ks, kw, self.head_dim, pos, cos, sin, self.interleaved);
            }
            // Every sequence's attention in one hand-off to the pool, by cache type (one
            // model's caches share it).
            let (mut f16s, mut f32s, mut q8s) = (Vec::new(), Vec::new(), Vec::new());
            let rows = q
                .chunks_exact(per_seq * qw)
                .zip(att.chunks_exact_mut(per_seq * qw))
                .zip(
                    k.chunks_exact(per_seq * kw)
                        .zip(v.chunks_exact(per_seq * kw)),
                );
            for (((q, out), (ks, vs)), cache) in rows.zip(caches.iter_mut()) {
                let pos = cache.len();
                match cache.append_rows(i, ks, vs)? {
                    KvRows::F16(k, v) => f16s.push(seq(q, k, v, pos, out)),
                    KvRows::F32(k, v) => f32s.push(seq(q, k, v, pos, out)),
                    KvRows::Q8(k, v) => q8s.push(seq(q, k, v, pos, out)),
                }
            }
            let scale = self.attn_scale as f32;
            ops::attention_batch(&mut f16s, heads, l.window, scale).map_err(err)?;
            ops::attention_batch(&mut f32s, heads, l.window, scale).map_err(err)?;
            ops::attention_batch(&mut q8s, heads, l.window, scale).map_err(err)?;
            let mut o = l.attn_output.rows(&att, n)?;
            if let Some(pn) = &rl.post_attn_norm {
                ops::rms_norm(&mut o, pn, self.eps);
            }
            ops::add(&mut x, &o);
            ops::rms_norm_into(&x, &rl.ffn_norm, self.eps, &mut h);
            let [mut g, u] = super::outputs(l.gate_up.rows(&h, n)?)?;
            match self.activation {
                Activation::Silu => ops::silu_mul(&mut g, &u),
                Activation::GeluTanh => ops::gelu_mul(&mut g, &u),
            }
            let mut d = l.ffn_down.rows(&g, n)?;
            if let Some(pn) = &rl.post_ffn_norm {
                ops::rms_norm(&mut d, pn, self.eps);
            }
            ops::add(&mut x, &d);
        }
        for c in caches.iter_mut() {
            c.advance(per_seq);
        }
        Ok(x)
    }

    /// Logits of the last of `tokens` appended to one sequence.
    pub(super) fn rows_forward(
        &self,
        w: &RowWeights,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<f32>> {
        let x = self.rows_pass(w, tokens, &mut [cache], tokens.len())?;
        let hidden = x.len() / tokens.len();
        let mut last = x[x.len() - hidden..].to_vec();
        ops::rms_norm(&mut last, &w.output_norm, self.eps);
        self.output.rows(&last, 1)
    }

    /// Logits of one new token per sequence.
    pub(super) fn rows_forward_batch(
        &self,
        w: &RowWeights,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut x = self.rows_pass(w, tokens, caches, 1)?;
        ops::rms_norm(&mut x, &w.output_norm, self.eps);
        let logits = self.output.rows(&x, tokens.len())?;
        Ok(logits
            .chunks_exact(self.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
