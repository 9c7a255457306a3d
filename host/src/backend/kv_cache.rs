//! One sequence's KV cache: per-layer keys and values that grow in place, as candle tensors
//! (the tensor forward pass) or as plain rows of f16 or f32 (the CPU forward pass).

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
}

/// Per-layer key and value rows of one element type.
type Rows<T> = Vec<(Vec<T>, Vec<T>)>;

enum RowStore {
    F16(Rows<f16>),
    F32(Rows<f32>),
}

/// One layer's keys and values so far, as [`KvCache::append_rows`] returns them.
pub enum KvRows<'a> {
    /// From an f16 cache.
    F16(&'a [f16], &'a [f16]),
    /// From an f32 cache.
    F32(&'a [f32], &'a [f32]),
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
                KvDType::F16 => RowStore::F16(vec![(Vec::new(), Vec::new()); n_layers]),
                KvDType::F32 => RowStore::F32(vec![(Vec::new(), Vec::new()); n_layers]),
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
) -> Result<(&'a [T], &'a [T])> {
    let (kc, vc) = rows
        .get_mut(layer)
        .ok_or_else(|| candle_core::Error::Msg(format!("no KV cache for layer {layer}")))?;
    for (c, new) in [(&mut *kc, k), (&mut *vc, v)] {
        c.truncate(held);
        if c.capacity() < cap {
            c.reserve_exact(cap - c.len());
        }
        c.resize(held + new.len(), T::default());
        T::narrow_slice(new, &mut c[held..]);
    }
    Ok((kc.as_slice(), vc.as_slice()))
}
