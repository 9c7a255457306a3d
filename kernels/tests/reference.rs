//! Every kernel against candle's reference: the weights dequantized by candle, multiplied in
//! f64 with the activations the kernel actually used (its 8-bit blocks, dequantized). The
//! integer sums are exact, so what remains is f32 rounding of per-block scales: 1e-5 of the
//! product's magnitude.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use wasmlm_kernels::act::{quantize_256, quantize_32};
use wasmlm_kernels::{Isa, QFormat, QMatrix};

/// xorshift64*: reproducible random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

const FORMATS: [(QFormat, GgmlDType); 5] = [
    (QFormat::Q4_0, GgmlDType::Q4_0),
    (QFormat::Q4_1, GgmlDType::Q4_1),
    (QFormat::Q8_0, GgmlDType::Q8_0),
    (QFormat::Q4K, GgmlDType::Q4K),
    (QFormat::Q6K, GgmlDType::Q6K),
];

/// Random blocks: every byte random (all nibble, sign and packed-scale patterns), but the f16
/// scales set to finite values of either sign, as a quantizer could write them.
fn random_blocks(format: QFormat, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut data: Vec<u8> = (0..blocks * bb).map(|_| rng.next() as u8).collect();
    let scale_at: &[usize] = match format {
        QFormat::Q4_0 | QFormat::Q8_0 => &[0],
        QFormat::Q4_1 | QFormat::Q4K => &[0, 2],
        QFormat::Q6K => &[208],
    };
    for b in data.chunks_exact_mut(bb) {
        for &at in scale_at {
            let v = half::f16::from_f32(rng.unit() * 0.05);
            b[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    data
}

fn candle_dequant(dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, dtype).expect("storage");
    let t = QTensor::new(storage, (rows, cols)).expect("qtensor");
    t.dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("dequantize")
}

/// The activations the kernels use, dequantized.
fn used_activations(format: QFormat, x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    if format.block_len() == 256 {
        quantize_256(x, cols).dequantize()
    } else {
        quantize_32(x, cols).dequantize()
    }
}

fn isas() -> Vec<Isa> {
    Isa::supported()
}

fn check(
    format: QFormat,
    dtype: GgmlDType,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    m: usize,
    rng: &mut Rng,
) {
    let w = candle_dequant(dtype, &data, rows, cols);
    let q = QMatrix::new(format, rows, cols, data).expect("matrix");
    // Dequantization matches candle's exactly.
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        q.dequantize_row(r, &mut row).expect("row");
        assert_eq!(
            &row[..],
            &w[r * cols..(r + 1) * cols],
            "{format:?} row {r} dequantized"
        );
    }
    let x: Vec<f32> = (0..m * cols).map(|_| rng.unit() * 4.0).collect();
    let xa: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|r| used_activations(format, r))
        .collect();
    for isa in isas() {
        let mut out = vec![f32::NAN; m * rows];
        q.matmul_with(isa, &x, m, &mut out).expect("matmul");
        for i in 0..m {
            for r in 0..rows {
                let (mut exact, mut mag) = (0f64, 0f64);
                for c in 0..cols {
                    let p = f64::from(w[r * cols + c]) * f64::from(xa[i * cols + c]);
                    exact += p;
                    mag += p.abs();
                }
                let got = f64::from(out[i * rows + r]);
                assert!(
                    (got - exact).abs() <= 1e-5 * mag.max(1e-30),
                    "{format:?} {isa:?} m={m} row {r} of input {i}: {got} vs {exact} (magnitude {mag})"
                );
            }
        }
    }
}

#[test]
fn random_blocks_match_candle_dequantize_then_matmul() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (format, dtype) in FORMATS {
        let cols = format.block_len() * 3;
        // Row counts of whole tiles of eight (the tiled layout) and not; activation rows in
        // tiles of four and remainders.
        for (rows, m) in [
            (7, 1),
            (5, 2),
            (3, 3),
            (9, 4),
            (4, 5),
            (6, 9),
            (8, 1),
            (16, 5),
            (24, 11),
            (32, 2),
            (40, 6),
        ] {
            let data = random_blocks(format, rows * cols / format.block_len(), &mut rng);
            check(format, dtype, data, rows, cols, m, &mut rng);
        }
    }
}

#[test]
fn candle_quantized_weights_match_and_large_products_split_across_threads() {
    let mut rng = Rng(42);
    // Enough rows that the product is split into several tasks; rows of more blocks than the
    // kernels convert scales for at once (64).
    for ((format, dtype), (rows, cols)) in FORMATS
        .into_iter()
        .flat_map(|f| [(f, (600, 512)), (f, (130, 2304))])
    {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let t = candle_core::Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let data = q.data().expect("data").into_owned();
        check(format, dtype, data, rows, cols, 3, &mut rng);
    }
}

#[test]
fn all_zero_activations_and_scales_give_zero() {
    for (format, _) in FORMATS {
        let cols = format.block_len();
        let q = QMatrix::new(format, 2, cols, vec![0; 2 * format.block_bytes()]).expect("matrix");
        let mut out = [1f32; 2];
        for isa in isas() {
            q.matmul_with(isa, &vec![0.0; cols], 1, &mut out)
                .expect("matmul");
            assert_eq!(out, [0.0, 0.0], "{format:?} {isa:?}");
        }
    }
}

#[test]
fn wrong_sizes_are_errors() {
    assert!(QMatrix::new(QFormat::Q4_1, 2, 48, vec![0; 60]).is_err());
    assert!(QMatrix::new(QFormat::Q4_1, 2, 64, vec![0; 79]).is_err());
    let q = QMatrix::new(QFormat::Q8_0, 2, 32, vec![0; 68]).expect("matrix");
    let mut out = [0f32; 2];
    assert!(q.matmul(&[0.0; 31], 1, &mut out).is_err());
    assert!(q.matmul(&[0.0; 32], 1, &mut out[..1]).is_err());
    assert!(q.dequantize_row(2, &mut [0.0; 32]).is_err());
}
