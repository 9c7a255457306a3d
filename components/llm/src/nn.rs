//! The client side of the LLM tensor protocol over `wasi:nn` (see `docs/wasi-nn-protocol.md`).

use crate::bindings::wasi::nn::errors::Error as NnError;
use crate::bindings::wasi::nn::graph::{self, Graph};
use crate::bindings::wasi::nn::inference::GraphExecutionContext;
use crate::bindings::wasi::nn::tensor::{Tensor, TensorType};
use crate::metadata::{ModelMetadata, PROTOCOL_VERSION};

/// A failed wasi-nn call, as text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn nn_error(what: &str, e: NnError) -> ProtocolError {
    ProtocolError(format!("{what}: {:?}: {}", e.code(), e.data()))
}

/// Loads the graph the host preloaded under `name`; `None` when there is none.
pub fn load_graph(name: &str) -> Result<Option<Graph>, ProtocolError> {
    match graph::load_by_name(name) {
        Ok(g) => Ok(Some(g)),
        Err(e) => match e.code() {
            crate::bindings::wasi::nn::errors::ErrorCode::NotFound => Ok(None),
            _ => Err(nn_error("load-by-name", e)),
        },
    }
}

/// One sequence: an execution context and the tokens its KV cache holds.
pub struct Sequence {
    ctx: GraphExecutionContext,
    /// Tokens in the KV cache, in order.
    pub cached: Vec<u32>,
}

impl Sequence {
    /// A fresh sequence on `graph`.
    pub fn new(graph: &Graph) -> Result<Self, ProtocolError> {
        let ctx = graph
            .init_execution_context()
            .map_err(|e| nn_error("init-execution-context", e))?;
        Ok(Self {
            ctx,
            cached: Vec::new(),
        })
    }

    /// The model's metadata document.
    pub fn metadata(&self) -> Result<ModelMetadata, ProtocolError> {
        let req = Tensor::new(&[0], TensorType::U8, &[]);
        let outputs = self
            .ctx
            .compute(vec![("metadata".to_string(), req)])
            .map_err(|e| nn_error("metadata", e))?;
        let bytes = find(&outputs, "metadata")?.data();
        let meta: ModelMetadata = serde_json::from_slice(&bytes)
            .map_err(|e| ProtocolError(format!("metadata is not valid JSON: {e}")))?;
        if meta.protocol != PROTOCOL_VERSION {
            return Err(ProtocolError(format!(
                "host speaks tensor protocol {}, this component speaks {PROTOCOL_VERSION}",
                meta.protocol
            )));
        }
        Ok(meta)
    }

    /// Cuts the cache to its first `keep` tokens, then appends `tokens` (at least one) and
    /// returns the logits after the last one.
    pub fn extend(&mut self, keep: usize, tokens: &[u32]) -> Result<Vec<f32>, ProtocolError> {
        let mut inputs = Vec::with_capacity(2);
        if keep < self.cached.len() {
            inputs.push(("truncate".to_string(), i64_tensor(&[keep as u32])));
            self.cached.truncate(keep);
        }
        inputs.push(("input_ids".to_string(), i64_tensor(tokens)));
        let outputs = match self.ctx.compute(inputs) {
            Ok(o) => o,
            Err(e) => {
                // The host may have applied the truncation but not the append: start over.
                let err = nn_error("compute", e);
                let _ = self.reset();
                self.cached.clear();
                return Err(err);
            }
        };
        self.cached.extend_from_slice(tokens);
        let logits = find(&outputs, "logits")?;
        if logits.ty() != TensorType::Fp32 {
            return Err(ProtocolError("logits are not f32".into()));
        }
        let bytes = logits.data();
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The hidden states of whole sequences (an encoder), `tokens` holding them one after
    /// another with the given lengths, in one pass: `(values, hidden)`.
    pub fn encode(
        &mut self,
        tokens: &[u32],
        lengths: &[u32],
    ) -> Result<(Vec<f32>, usize), ProtocolError> {
        let outputs = self
            .ctx
            .compute(vec![
                ("input_ids".to_string(), i64_tensor(tokens)),
                ("sequence_lengths".to_string(), i64_tensor(lengths)),
            ])
            .map_err(|e| nn_error("compute", e))?;
        let states = find(&outputs, "hidden_states")?;
        let dims = states.dimensions();
        if states.ty() != TensorType::Fp32 || dims.len() != 2 || dims[1] == 0 {
            return Err(ProtocolError(
                "hidden_states are not f32 [n, hidden]".into(),
            ));
        }
        let values = states
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((values, dims[1] as usize))
    }

    /// Empties the cache.
    pub fn reset(&mut self) -> Result<(), ProtocolError> {
        self.ctx
            .compute(vec![("truncate".to_string(), i64_tensor(&[0]))])
            .map_err(|e| nn_error("truncate", e))?;
        self.cached.clear();
        Ok(())
    }
}

fn i64_tensor(values: &[u32]) -> Tensor {
    let data: Vec<u8> = values
        .iter()
        .flat_map(|&v| i64::from(v).to_le_bytes())
        .collect();
    Tensor::new(&[values.len() as u32], TensorType::I64, &data)
}

fn find<'a>(outputs: &'a [(String, Tensor)], name: &str) -> Result<&'a Tensor, ProtocolError> {
    outputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| ProtocolError(format!("the host returned no '{name}' tensor")))
}
