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

/// How a run of values becomes integers: portable, or AVX2 (the same integers).
#[derive(Clone, Copy)]
struct Quantizer {
    avx2: bool,
}

impl Quantizer {
    fn new() -> Self {
        Self {
            avx2: cfg!(target_arch = "x86_64") && crate::Isa::detect() >= crate::Isa::Avx2,
        }
    }

    /// The largest magnitude of `x` (a multiple of 32 values), NaN ignored.
    fn amax(self, x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 and FMA run here (`Isa::detect`).
            return unsafe { crate::x86::amax(x) };
        }
        x.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// `(scale, 1 / scale)` that maps the largest magnitude of `x` (a multiple of 32
    /// values) to 127.
    fn scale(self, x: &[f32]) -> (f32, f32) {
        let d = self.amax(x) / 127.0;
        (d, if d > 0.0 { 1.0 / d } else { 0.0 })
    }

    /// `q = round(x · id)` for 32 values; the sums of the first and the last 16 integers.
    fn ints(self, x: &[f32; 32], id: f32, q: &mut [i8; 32]) -> (i32, i32) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: as in `scale`.
            return unsafe { crate::x86::quantize32(x, id, q) };
        }
        let mut sums = [0i32; 2];
        for (i, (q, &v)) in q.iter_mut().zip(x).enumerate() {
            // The product is within ±127 (and NaN maps to 0), so the cast neither wraps nor
            // saturates.
            *q = (v * id).round() as i8;
            sums[i / 16] += i32::from(*q);
        }
        (sums[0], sums[1])
    }
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
    let quant = Quantizer::new();
    let (blocks, _) = x.as_chunks::<32>();
    let (qs, _) = a.qs.as_chunks_mut::<32>();
    for (c, q) in blocks.iter().zip(qs) {
        let (d, id) = quant.scale(c);
        let (s0, s1) = quant.ints(c, id, q);
        a.d.push(d);
        a.s.push(d * (s0 + s1) as f32);
    }
    a
}

/// `x` (a multiple of 32 values) as ggml's q8_0 blocks, into `q` (as many integers) and
/// `d` (one scale per 32): the scale is rounded to f16 as ggml stores it, the integers come
/// from the unrounded one, as in ggml's `quantize_row_q8_0`, so `q · d` is what llama.cpp
/// reads back from a q8_0 KV cache.
pub fn quantize_q8_0_into(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    let quant = Quantizer::new();
    let (blocks, _) = x.as_chunks::<32>();
    let (qs, _) = q.as_chunks_mut::<32>();
    for ((c, q), d) in blocks.iter().zip(qs).zip(d.iter_mut()) {
        let (scale, id) = quant.scale(c);
        quant.ints(c, id, q);
        *d = half::f16::from_f32(scale).to_f32();
    }
}

/// The values that q8_0 integers `q` with one scale in `d` per 32 stand for, into `out`
/// (as many as `q`).
pub fn dequantize_q8_0_into(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((out, q), &d) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).zip(d) {
        for (x, &q) in out.iter_mut().zip(q) {
            *x = f32::from(q) * d;
        }
    }
}

/// Rows of `cols` values (`cols` a multiple of 256) as 256-wide blocks.
pub fn quantize_256(x: &[f32], cols: usize) -> Acts256 {
    let quant = Quantizer::new();
    let data = x
        .chunks_exact(256)
        .map(|c| {
            let (d, id) = quant.scale(c);
            let mut qs = [0i8; 256];
            let mut bsums = [0i16; 16];
            let (runs, _) = c.as_chunks::<32>();
            let (qruns, _) = qs.as_chunks_mut::<32>();
            for (i, (run, q)) in runs.iter().zip(qruns).enumerate() {
                let (s0, s1) = quant.ints(run, id, q);
                // 16 values of at most 127 in magnitude fit an i16.
                bsums[2 * i] = s0 as i16;
                bsums[2 * i + 1] = s1 as i16;
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
        let mut out = vec![0f32; self.qs.len()];
        dequantize_q8_0_into(&self.qs, &self.d, &mut out);
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that hit every rounding case: ties (x · id exactly k + 0.5), values next to
    /// them, zeros, NaN and the infinities.
    fn awkward(n: usize) -> Vec<f32> {
        let mut s = 7u32;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let r = ((s >> 8) % 2001) as f32 / 1000.0 - 1.0;
                match i % 97 {
                    0 => 127.0, // the block's maximum: id = 1, so halves land exactly
                    1..=20 => ((s >> 8) % 255) as f32 / 2.0 - 63.5,
                    21 => f32::NAN,
                    22 => 0.0,
                    23 => -0.0,
                    24 => f32::from_bits((2.5f32).to_bits() - 1),
                    25 => -f32::from_bits((2.5f32).to_bits() + 1),
                    _ => r * 100.0,
                }
            })
            .collect()
    }

    #[test]
    fn avx2_quantizes_to_the_same_integers_as_the_portable_code() {
        if !Quantizer::new().avx2 {
            return;
        }
        let portable = Quantizer { avx2: false };
        let avx2 = Quantizer { avx2: true };
        let mut x = awkward(256 * 40);
        x[300] = f32::INFINITY;
        x[700] = f32::NEG_INFINITY;
        let (blocks, _) = x.as_chunks::<32>();
        for c in blocks {
            let (d, id) = portable.scale(c);
            assert_eq!(avx2.scale(c), (d, id));
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            for id in [id, 1.0, 0.999_999_9, 1.000_000_1] {
                assert_eq!(portable.ints(c, id, &mut q1), avx2.ints(c, id, &mut q2));
                assert_eq!(q1, q2, "{c:?} · {id}");
            }
        }
    }
}
