//! One sequence's KV cache: per-layer key and value tensors that grow in place.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of one sequence for every layer, `(1, n_kv_head, capacity, head_dim)` each.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
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
            capacity: 0,
            len: 0,
            max_len,
        }
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

    fn grow(&mut self, needed: usize, like: &Tensor) -> Result<()> {
        let new_cap = needed
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(self.max_len);
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
