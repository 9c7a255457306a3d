//! wasmlm's host: runs LLM components on wasmtime and serves their `wasi:nn` imports with a
//! native candle backend.

pub mod backend;
pub mod compose;
pub mod device;
pub mod gguf;
pub mod hub;
pub mod models;
pub mod runtime;
pub mod server;

/// Host-side bindings of the component's exports.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "llm-host",
        path: "../wit",
    });
}
