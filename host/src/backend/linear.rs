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
            Linear::Candle(q) => {
                let t = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                q.forward(&t)?
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
