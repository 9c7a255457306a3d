//! Activations quantized to 8 bits, once per product, so the weight kernels can dot integers.
//!
//! Scales are f32 (ggml stores f16 for the 32-wide blocks): one rounding less, and these
//! blocks never leave memory.

/// Rows of activations in 32-wide blocks, as planes: row `r`'s block `b` stands for
/// `qs[r·cols + 32b ..][..32] · d[r·blocks + b]`, and `s[r·blocks + b]` is `d` times the sum of
/// its integers (for formats with a minimum or an offset). Planes let a kernel read the
/// scales of a row as vectors.
#[derive(Debug, Clone, Default)]
pub struct Acts32 {
    /// The integers, row after row.
    pub qs: Vec<i8>,
    /// The scale of each block.
    pub d: Vec<f32>,
    /// `d` times the sum of each block's integers.
    pub s: Vec<f32>,
    /// Blocks per row.
    pub blocks: usize,
}

/// 256 activations: `x[i] ≈ qs[i] · d`, with the sum of each 16 integers in `bsums` (the
/// K-formats' minimums apply per group of 16 or 32).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Act256 {
    /// The integers.
    pub qs: [i8; 256],
    /// Sums of `qs` per 16.
    pub bsums: [i16; 16],
    /// The scale.
    pub d: f32,
}

/// Rows of activations in 256-wide blocks.
#[derive(Debug, Clone, Default)]
pub struct Acts256 {
    /// Row after row.
    pub data: Vec<Act256>,
    /// Blocks per row.
    pub blocks: usize,
}

/// `(scale, 1 / scale)` that maps the largest magnitude of `x` to 127.
fn scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

fn to_i8(v: f32, id: f32) -> i8 {
    // The product is within ±127 (and NaN maps to 0), so the cast neither wraps nor saturates.
    (v * id).round() as i8
}

/// Rows of `cols` values (`cols` a multiple of 32) as 32-wide blocks.
pub fn quantize_32(x: &[f32], cols: usize) -> Acts32 {
    let n = x.len() / 32;
    let mut a = Acts32 {
        qs: vec![0; n * 32],
        d: Vec::with_capacity(n),
        s: Vec::with_capacity(n),
        blocks: cols / 32,
    };
    for (c, q) in x.chunks_exact(32).zip(a.qs.chunks_exact_mut(32)) {
        let (d, id) = scale(c);
        let mut sum = 0i32;
        for (q, &v) in q.iter_mut().zip(c) {
            *q = to_i8(v, id);
            sum += i32::from(*q);
        }
        a.d.push(d);
        a.s.push(d * sum as f32);
    }
    a
}

/// Rows of `cols` values (`cols` a multiple of 256) as 256-wide blocks.
pub fn quantize_256(x: &[f32], cols: usize) -> Acts256 {
    let data = x
        .chunks_exact(256)
        .map(|c| {
            let (d, id) = scale(c);
            let mut qs = [0i8; 256];
            for (q, &v) in qs.iter_mut().zip(c) {
                *q = to_i8(v, id);
            }
            let mut bsums = [0i16; 16];
            for (s, g) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| i16::from(q)).sum();
            }
            Act256 { qs, bsums, d }
        })
        .collect();
    Acts256 {
        data,
        blocks: cols / 256,
    }
}

impl Acts32 {
    /// The values these blocks stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(32)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&q| f32::from(q) * d))
            .collect()
    }
}

impl Acts256 {
    /// The values these blocks stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        self.data
            .iter()
            .flat_map(|a| a.qs.map(|q| f32::from(q) * a.d))
            .collect()
    }
}
