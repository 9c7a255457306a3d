//! Weight matrices the forward pass multiplies by: the project's own kernels
//! (`wasmlm-kernels`) for the GGUF formats they cover on the CPU, candle's `QMatMul` for the
//! rest (other formats, dense safetensors weights, other devices).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use wasmlm_kernels::{QFormat, QMatrix};

use super::BackendModelError;

/// `x · Wᵀ` for one weight matrix `W` (`out_features × in_features`).
#[derive(Clone)]
pub enum Linear {
    /// Quantized weights multiplied by `wasmlm-kernels`.
    Native(Arc<QMatrix>),
    /// Anything else, through candle.
    Candle(QMatMul),
    /// Dense bf16/f16 weights (off the CPU): activations are cast to their dtype for the
    /// product (which accumulates in f32) and back.
    Dense(Tensor),
}

/// The kernels' name for a GGUF block type they cover.
fn native_format(dtype: GgmlDType) -> Option<QFormat> {
    Some(match dtype {
        GgmlDType::Q4_0 => QFormat::Q4_0,
        GgmlDType::Q4_1 => QFormat::Q4_1,
        GgmlDType::Q8_0 => QFormat::Q8_0,
        GgmlDType::Q4K => QFormat::Q4K,
        GgmlDType::Q6K => QFormat::Q6K,
        _ => None?,
    })
}

/// `q` as a matrix for the native kernels, when its format and device allow; `Err(q)` hands
/// it back otherwise.
pub fn native_matrix(q: QTensor) -> Result<Result<QMatrix, QTensor>, BackendModelError> {
    let Some(format) = native_format(q.dtype()) else {
        return Ok(Err(q));
    };
    let (rows, cols) = match (q.device().is_cpu(), q.shape().dims()) {
        (true, &[rows, cols]) => (rows, cols),
        _ => return Ok(Err(q)),
    };
    let data = q.data()?.into_owned();
    drop(q);
    QMatrix::new(format, rows, cols, data)
        .map(Ok)
        .map_err(|e| BackendModelError::Invalid(e.to_string()))
}

impl Linear {
    /// A matrix of dense weights (f32 through candle's own path).
    pub fn dense(w: Tensor) -> Self {
        match w.dtype() {
            DType::F32 => Linear::Candle(QMatMul::Tensor(w)),
            _ => Linear::Dense(w),
        }
    }

    /// A matrix of quantized weights.
    pub fn quantized(q: QTensor) -> Result<Self, BackendModelError> {
        Ok(match native_matrix(q)? {
            Ok(m) => Linear::Native(Arc::new(m)),
            Err(q) => Linear::Candle(QMatMul::from_qtensor(q)?),
        })
    }

    /// `x · Wᵀ` for `m` rows of `x`, as rows.
    pub fn rows(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Linear::Native(w) => {
                let mut out = vec![0f32; m * w.rows()];
                w.matmul(x, m, &mut out)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Ok(out)
            }
            Linear::Candle(_) | Linear::Dense(_) => {
                let t = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                self.forward(&t)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()
            }
        }
    }

    /// `x · Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            // candle's dense product (its batch broadcasting), in the weights' dtype.
            Linear::Dense(w) => QMatMul::Tensor(w.clone())
                .forward(&x.to_dtype(w.dtype())?)?
                .to_dtype(x.dtype()),
            Linear::Native(w) => {
                let mut dims = x.dims().to_vec();
                let k = dims.last().copied().unwrap_or(0);
                if k != w.cols() {
                    candle_core::bail!("input of width {k} for a {w:?}");
                }
                let m = x.elem_count() / k.max(1);
                let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let mut out = vec![0f32; m * w.rows()];
                w.matmul(&xs, m, &mut out)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                if let Some(last) = dims.last_mut() {
                    *last = w.rows();
                }
                Tensor::from_vec(out, dims, &Device::Cpu)?.to_device(x.device())
            }
        }
    }
}

/// Products of one input by several matrices, in as few products as their storage allows:
/// adjacent matrices of one format and width are stacked into one (their rows one after the
/// other), so the input is quantized, read and (on a GPU) launched once per stack.
#[derive(Clone)]
pub struct Stacked {
    /// Each product, with the number of output features of each matrix stacked in it.
    stacks: Vec<(Linear, Vec<usize>)>,
}

impl Stacked {
    /// The products `stacks` hold, each with the widths of the matrices stacked in it.
    pub fn new(stacks: Vec<(Linear, Vec<usize>)>) -> Self {
        Self { stacks }
    }

    /// How many products one input costs.
    pub fn products(&self) -> usize {
        self.stacks.len()
    }

    /// `x · Wᵢᵀ` for each matrix, over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (w, widths) in &self.stacks {
            let y = w.forward(x)?;
            if widths.len() == 1 {
                out.push(y);
                continue;
            }
            let mut at = 0;
            for &n in widths {
                out.push(y.narrow(candle_core::D::Minus1, at, n)?);
                at += n;
            }
        }
        Ok(out)
    }

    /// `x · Wᵢᵀ` for each matrix and `m` rows of `x`, as rows.
    pub fn rows(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for (w, widths) in &self.stacks {
            let y = w.rows(x, m)?;
            if widths.len() == 1 {
                out.push(y);
                continue;
            }
            let total: usize = widths.iter().sum();
            let mut at = 0;
            for &n in widths {
                let mut part = Vec::with_capacity(m * n);
                for row in y.chunks_exact(total) {
                    part.extend_from_slice(&row[at..at + n]);
                }
                out.push(part);
                at += n;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_weights_multiply_like_f32_within_bf16_rounding() {
        let dev = Device::Cpu;
        let w32 = Tensor::randn(0f32, 1.0, (48, 64), &dev).unwrap();
        let w = w32.to_dtype(DType::BF16).unwrap();
        let exact = Linear::dense(w.to_dtype(DType::F32).unwrap());
        let half = Linear::dense(w);
        assert!(matches!(half, Linear::Dense(_)) && matches!(exact, Linear::Candle(_)));
        for shape in [vec![3, 64], vec![1, 3, 64], vec![2, 1, 3, 64]] {
            let x = Tensor::randn(0f32, 1.0, shape.clone(), &dev).unwrap();
            let a = half.forward(&x).unwrap();
            let b = exact.forward(&x).unwrap();
            assert_eq!(a.dtype(), DType::F32);
            assert_eq!(a.dims(), b.dims(), "{shape:?}");
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // Only the activations' rounding to bf16 separates the two (8 bits of mantissa).
            assert!(err <= scale * 2e-2, "{shape:?}: {err} vs {scale}");
        }
        let rows = half.rows(&vec![0.5f32; 2 * 64], 2).unwrap();
        assert_eq!(rows.len(), 2 * 48);
    }
}
