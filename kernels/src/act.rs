//! Activations quantized to 8 bits, once per product, so the weight kernels can dot integers.
//!
//! The scale is f32 (ggml stores f16 for the 32-wide blocks): one rounding less, and these
//! blocks never leave memory.

/// 32 activations: `x[i] ≈ qs[i] · d`, and `s = d · Σ qs` for formats with a minimum or offset.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Act32 {
    /// The integers.
    pub qs: [i8; 32],
    /// The scale.
    pub d: f32,
    /// `d` times the sum of `qs`.
    pub s: f32,
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

/// `x` (a multiple of 32 long) as 32-wide blocks.
pub fn quantize_32(x: &[f32]) -> impl Iterator<Item = Act32> + '_ {
    x.chunks_exact(32).map(|c| {
        let (d, id) = scale(c);
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(c) {
            *q = to_i8(v, id);
        }
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Act32 {
            qs,
            d,
            s: d * sum as f32,
        }
    })
}

/// `x` (a multiple of 256 long) as 256-wide blocks.
pub fn quantize_256(x: &[f32]) -> impl Iterator<Item = Act256> + '_ {
    x.chunks_exact(256).map(|c| {
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
}

impl Act32 {
    /// The 32 values this block stands for.
    pub fn dequantize(&self) -> [f32; 32] {
        self.qs.map(|q| f32::from(q) * self.d)
    }
}

impl Act256 {
    /// The 256 values this block stands for.
    pub fn dequantize(&self) -> [f32; 256] {
        self.qs.map(|q| f32::from(q) * self.d)
    }
}
