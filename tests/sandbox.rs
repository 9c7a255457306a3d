//! Guests are sandboxed: with the WASI context every LLM instance gets, a guest can read no
//! host file, list no directory, open no socket and see no environment.

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Runs the probe under `wasi`; returns its exit code.
fn run_probe(wasi: WasiCtx) -> i32 {
    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config).unwrap();
    let probe = env!("WASMLM_SANDBOX_PROBE");
    assert!(
        !probe.is_empty(),
        "the sandbox probe was not built (WASMLM_COMPONENT_WASM skips the guest build)"
    );
    let component = Component::from_file(&engine, probe).unwrap();
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let mut store = Store::new(
        &engine,
        State {
            wasi,
            table: ResourceTable::new(),
        },
    );
    let command = Command::instantiate(&mut store, &component, &linker).unwrap();
    match command.wasi_cli_run().call_run(&mut store) {
        Ok(Ok(())) => 0,
        Ok(Err(())) => 1,
        Err(e) => e
            .downcast_ref::<I32Exit>()
            .map(|e| e.0)
            .expect("the probe exits, it does not trap"),
    }
}

#[test]
fn guests_cannot_reach_the_host() {
    assert_eq!(
        run_probe(wasmlm_host::runtime::sandboxed_wasi()),
        0,
        "the sandbox let the probe through"
    );
}

#[test]
fn the_probe_notices_a_granted_directory() {
    // The control: the same probe, given the host's root, does get out. Without this, a probe
    // that could never succeed would make the test above meaningless.
    let mut b = WasiCtxBuilder::new();
    b.preopened_dir("/", "/", FsPerms::ReadOnly).unwrap();
    assert_eq!(run_probe(b.build()), 1);
}
