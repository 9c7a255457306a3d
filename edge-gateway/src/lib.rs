//! wasmlm's edge gateway: one OpenAI-compatible endpoint in front of many `wasmlm serve` nodes
//! on heterogeneous devices. It places each request on a node that serves the model on a
//! compatible device, has room, and likely holds the conversation's KV cache; it retries before
//! the first byte and streams answers through. It depends on neither wasmtime nor candle.

pub mod affinity;
pub mod api;
pub mod config;
pub mod error;
pub mod gateway;
pub mod inventory;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
