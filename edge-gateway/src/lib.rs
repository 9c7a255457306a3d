//! wasmlm's edge gateway: one OpenAI-compatible endpoint in front of many hosts on
//! heterogeneous devices. Placement, health checks and failover arrive with the gateway issue;
//! this crate stays free of wasmtime and candle.
