//! The qwen3 architecture (Qwen3 dense models): llama with an RMS norm over each head of q
//! and k before rotation, no biases, and a head size of its own (`attention.key_length`,
//! `head_dim`: 128 on Qwen3-0.6B, whose hidden size is 1024 for 16 heads).

use super::decoder::Family;

/// Qwen3 adds per-head q/k norms.
pub const FAMILY: Family = Family {
    qk_norm: true,
    ..Family::LLAMA
};
