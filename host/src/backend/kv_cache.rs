//! One sequence's KV cache: per-layer keys and values that grow in place, as candle tensors
//! (the tensor forward pass) or as plain rows of f16, f32 or q8_0 (the CPU forward pass).

use candle_core::{DType, Device, Result, Tensor};
use wasmlm_kernels::ops::{f16, KvValue};

/// The element type of the CPU pass's KV rows (a model's `kv_cache` in the node config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    /// f16, llama.cpp's default: half the bytes that each decode step reads.
    #[default]
    F16,
    /// f32: exact (like llama.cpp's `--cache-type-k f32 --cache-type-v f32`).
    F32,
    /// ggml's q8_0 (`--cache-type-k q8_0 --cache-type-v q8_0`): 8-bit values with an f16
    /// scale per 32 (kept as f32 here), 1.125 bytes a value against f16's 2: 1.8 times the
    /// context in the same memory.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl KvDType {
    /// The name the node config uses.
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F16 => "f16",
            KvDType::F32 => "f32",
            KvDType::Q8_0 => "q8_0",
        }
    }

    /// Parses a name of [`KvDType::name`].
    pub fn parse(name: &str) -> Option<Self> {
        [KvDType::F16, KvDType::F32, KvDType::Q8_0]
            .into_iter()
            .find(|t| t.name() == name)
    }

    /// `WASMLM_KV_DTYPE` (a developers' override) or the default.
    pub fn from_env() -> Self {
        std::env::var("WASMLM_KV_DTYPE")
            .ok()
            .and_then(|v| KvDType::parse(&v))
            .unwrap_or_default()
    }
}

impl std::str::FromStr for KvDType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        KvDType::parse(s).ok_or_else(|| format!("unknown KV cache type '{s}' (f16, f32, q8_0)"))
    }
}

/// The rows of one layer's keys or values, and for q8_0 the scale of every 32 values.
#[derive(Clone, Default)]
struct Plane<T> {
    values: Vec<T>,
    scales: Vec<f32>,
}

/// Per-layer key and value rows of one element type.
type Rows<T> = Vec<(Plane<T>, Plane<T>)>;

enum RowStore {
    F16(Rows<f16>),
    F32(Rows<f32>),
    Q8(Rows<i8>),
}

/// Keys or values of one layer so far: the values, and their block scales where the type
/// has them (empty otherwise).
pub struct KvView<'a, T> {
    pub values: &'a [T],
    pub scales: &'a [f32],
}

/// One layer's keys and values so far, as [`KvCache::append_rows`] returns them.
pub enum KvRows<'a> {
    /// From an f16 cache.
    F16(KvView<'a, f16>, KvView<'a, f16>),
    /// From an f32 cache.
    F32(KvView<'a, f32>, KvView<'a, f32>),
    /// From a q8_0 cache.
    Q8(KvView<'a, i8>, KvView<'a, i8>),
}

/// Keys and values of one sequence for every layer.
pub struct KvCache {
    /// `(1, n_kv_head, capacity, head_dim)` tensors, allocated on first use.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Or `[position][n_kv_head · head_dim]` rows, `row` values each.
    rows: RowStore,
    row: usize,
    capacity: usize,
    len: usize,
    max_len: usize,
}

/// Smallest allocation, in positions; capacity doubles from there up to `max_len`.
const MIN_CAPACITY: usize = 256;

impl KvCache {
    /// An empty cache for `n_layers` layers holding at most `max_len` positions.
    pub fn new(n_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            rows: RowStore::F32(Vec::new()),
            row: 0,
            capacity: 0,
            len: 0,
            max_len,
        }
    }

    /// An empty cache of plain rows (`row` values of keys, and of values, per position).
    pub fn new_rows(n_layers: usize, max_len: usize, row: usize, dtype: KvDType) -> Self {
        Self {
            layers: Vec::new(),
            rows: match dtype {
                KvDType::F16 => RowStore::F16(vec![Default::default(); n_layers]),
                KvDType::F32 => RowStore::F32(vec![Default::default(); n_layers]),
                KvDType::Q8_0 => RowStore::Q8(vec![Default::default(); n_layers]),
            },
            row,
            capacity: 0,
            len: 0,
            max_len,
        }
    }

    /// Writes the keys and values of `n` positions (`n × row` each) of `layer` after the held
    /// positions (rounded to the cache's type) and returns all of the layer's keys and values
    /// so far. Call [`KvCache::advance`] once all layers have appended.
    pub fn append_rows(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<KvRows<'_>> {
        let n = k.len() / self.row.max(1);
        let end = self.len + n;
        if end > self.max_len {
            candle_core::bail!("KV cache full: {end} positions > {}", self.max_len);
        }
        if k.len() != v.len() || k.len() != n * self.row {
            candle_core::bail!(
                "KV rows of {} and {} values, {} per position",
                k.len(),
                v.len(),
                self.row
            );
        }
        if end > self.capacity {
            // Exact reservations on the tensors' schedule: Vec's own growth could double a 2k
            // cache to 4k, past the context.
            self.capacity = self.next_capacity(end);
        }
        let (held, cap) = (self.len * self.row, self.capacity * self.row);
        Ok(match &mut self.rows {
            RowStore::F16(rows) => {
                let (k, v) = append(rows, layer, held, cap, k, v)?;
                KvRows::F16(k, v)
            }
            RowStore::F32(rows) => {
                let (k, v) = append(rows, layer, held, cap, k, v)?;
                KvRows::F32(k, v)
            }
            RowStore::Q8(rows) => {
                if !self.row.is_multiple_of(32) {
                    candle_core::bail!("a q8_0 KV cache needs rows of a multiple of 32 values");
                }
                let (k, v) = append(rows, layer, held, cap, k, v)?;
                KvRows::Q8(k, v)
            }
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k` and `v` (`(1, n_kv_head, n, head_dim)`) of `layer` after the held positions and
    /// returns all keys and values of the layer so far. Call [`KvCache::advance`] once all
    /// layers have appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let end = self.len + n;
        if end > self.max_len {
            candle_core::bail!("KV cache full: {end} positions > {}", self.max_len);
        }
        if end > self.capacity {
            self.grow(end, k)?;
        }
        // `grow` allocates every layer, so a slot is filled once capacity covers `end`.
        let (kc, vc) = self.layers[layer]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("no KV cache for layer {layer}")))?;
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kc.narrow(2, 0, end)?, vc.narrow(2, 0, end)?))
    }

    /// Marks `n` appended positions as held.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// The capacity to grow to for `needed` positions: doubling from [`MIN_CAPACITY`], never
    /// past `max_len`.
    fn next_capacity(&self, needed: usize) -> usize {
        needed
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(self.max_len)
    }

    fn grow(&mut self, needed: usize, like: &Tensor) -> Result<()> {
        let new_cap = self.next_capacity(needed);
        let (_, n_kv, _, hd) = like.dims4()?;
        let alloc = |dev: &Device, dt: DType| Tensor::zeros((1, n_kv, new_cap, hd), dt, dev);
        for layer in self.layers.iter_mut() {
            let k = alloc(like.device(), like.dtype())?;
            let v = alloc(like.device(), like.dtype())?;
            if let Some((ok, ov)) = layer.as_ref() {
                if self.len > 0 {
                    k.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *layer = Some((k, v));
        }
        self.capacity = new_cap;
        Ok(())
    }
}

/// Writes `k` and `v` into `layer`'s rows after their first `held` values, reserving exactly
/// `cap` values, and returns the rows so far.
fn append<'a, T: KvValue>(
    rows: &'a mut Rows<T>,
    layer: usize,
    held: usize,
    cap: usize,
    k: &[f32],
    v: &[f32],
) -> Result<(KvView<'a, T>, KvView<'a, T>)> {
    let (kc, vc) = rows
        .get_mut(layer)
        .ok_or_else(|| candle_core::Error::Msg(format!("no KV cache for layer {layer}")))?;
    for (c, new) in [(&mut *kc, k), (&mut *vc, v)] {
        exact_room(&mut c.values, held, cap);
        c.values.resize(held + new.len(), T::default());
        // One scale per 32 values where the type has them, none otherwise.
        let blocks = |values: usize| if T::BLOCK_SCALED { values / 32 } else { 0 };
        let held_blocks = blocks(held);
        exact_room(&mut c.scales, held_blocks, blocks(cap));
        c.scales.resize(held_blocks + blocks(new.len()), 0.0);
        T::narrow_slice(new, &mut c.values[held..], &mut c.scales[held_blocks..]);
    }
    let view = |p: &'a Plane<T>| KvView {
        values: &p.values,
        scales: &p.scales,
    };
    Ok((view(kc), view(vc)))
}

/// Keeps the first `held` of `c` and reserves room for exactly `cap` in all.
fn exact_room<T>(c: &mut Vec<T>, held: usize, cap: usize) {
    c.truncate(held);
    if c.capacity() < cap {
        c.reserve_exact(cap - c.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, row: usize, seed: f32) -> Vec<f32> {
        (0..n * row)
            .map(|i| ((i as f32 * 0.37 + seed).sin()) * 3.0)
            .collect()
    }

    /// The keys a cache returns, dequantized.
    fn keys(r: KvRows<'_>) -> Vec<f32> {
        match r {
            KvRows::Q8(k, _) => {
                let mut out = vec![0f32; k.values.len()];
                wasmlm_kernels::act::dequantize_q8_0_into(k.values, k.scales, &mut out);
                out
            }
            KvRows::F16(k, _) => k.values.iter().map(|v| v.to_f32()).collect(),
            KvRows::F32(k, _) => k.values.to_vec(),
        }
    }

    #[test]
    fn a_truncated_q8_0_cache_is_the_cache_of_its_positions() {
        let row = 64;
        let (a, b, c) = (rows(3, row, 0.0), rows(2, row, 1.0), rows(1, row, 2.0));
        let mut cache = KvCache::new_rows(1, 16, row, KvDType::Q8_0);
        cache.append_rows(0, &a, &a).unwrap();
        cache.advance(3);
        cache.truncate(1);
        let got = keys(cache.append_rows(0, &b, &b).unwrap());
        let mut fresh = KvCache::new_rows(1, 16, row, KvDType::Q8_0);
        fresh.append_rows(0, &a[..row], &a[..row]).unwrap();
        fresh.advance(1);
        let want = keys(fresh.append_rows(0, &b, &b).unwrap());
        assert_eq!(got, want);
        assert_eq!(got.len(), 3 * row);
        // Within q8_0's rounding of the values written.
        let all: Vec<f32> = a[..row].iter().chain(&b).copied().collect();
        for (g, w) in got.iter().zip(&all) {
            assert!((g - w).abs() <= 3.0 / 254.0 + 1e-3, "{g} vs {w}");
        }
        // A row the blocks do not divide is an error, not a misread.
        let mut odd = KvCache::new_rows(1, 16, 40, KvDType::Q8_0);
        assert!(odd.append_rows(0, &c[..40], &c[..40]).is_err());
    }
}
