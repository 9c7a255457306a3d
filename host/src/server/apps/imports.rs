//! Which imports an app may have: the ones the app linker provides, named here so that an app
//! asking for anything else fails at start with a message that names every missing import.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceType};
use wasmtime::Engine;

/// WASI packages the linker provides, in both their 0.2 (p2) and 0.3 (p3) versions.
const WASI_PACKAGES: &[&str] = &[
    "wasi:io",
    "wasi:clocks",
    "wasi:random",
    "wasi:cli",
    "wasi:filesystem",
    "wasi:sockets",
];

/// The `wasi:nn` version of `wasmtime-wasi-nn` 48 (a pre-release: matched exactly).
pub const WASI_NN_VERSION: &str = "0.2.0-rc-2024-10-28";

/// Whether the app linker defines the import `name` (`ns:pkg/iface@version`), with wasmtime's
/// semver matching: any `0.2.x` meets the host's `0.2.12`, pre-releases only match exactly.
pub fn provided(name: &str) -> bool {
    let Some((path, version)) = name.split_once('@') else {
        return false;
    };
    let Some((package, interface)) = path.split_once('/') else {
        return false;
    };
    let p2 = version.starts_with("0.2.") && !version.contains('-');
    let p3 = version == "0.3.0";
    if WASI_PACKAGES.contains(&package) {
        // wasi:io has no 0.3 version: p3 streams are built into the component model.
        return p2 || (p3 && package != "wasi:io");
    }
    match package {
        "wasi:http" => {
            (p2 && matches!(interface, "types" | "outgoing-handler"))
                || (p3 && matches!(interface, "types" | "client"))
        }
        "wasi:nn" => version == WASI_NN_VERSION,
        "fermyon:spin" => version == "2.0.0" && interface == "llm",
        _ => false,
    }
}

/// The imports of `component` the app linker does not provide.
pub fn missing(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .filter(|name| !provided(name))
        .collect()
}

/// Resources of stubbed interfaces; no value of it is ever made.
struct Stubbed;

/// Defines every function of the `missing` imports as a trap that names it, and their
/// resources as host types nothing creates. Only these are stubbed: stubbing what the linker
/// already defines would shadow the real WASI (wasmtime#10663).
pub fn stub<T: 'static>(
    linker: &mut Linker<T>,
    engine: &Engine,
    component: &Component,
    missing: &[String],
) -> wasmtime::Result<()> {
    for (name, item) in component.component_type().imports(engine) {
        if !missing.iter().any(|m| m == name) {
            continue;
        }
        // A bare function or component import cannot be stubbed; instantiation names it.
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        let mut inst = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let full = format!("{name}#{export}");
                    inst.func_new(export, move |_, _, _, _| {
                        Err(wasmtime::Error::msg(format!(
                            "the app called {full}, which this node does not provide"
                        )))
                    })?;
                }
                ComponentItem::Resource(_) => {
                    inst.resource(export, ResourceType::host::<Stubbed>(), |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::provided;

    #[test]
    fn the_linkers_interfaces_are_provided_and_nothing_else() {
        for ok in [
            "wasi:io/streams@0.2.0",
            "wasi:cli/environment@0.2.6",
            "wasi:cli/environment@0.3.0",
            "wasi:http/types@0.2.0",
            "wasi:http/outgoing-handler@0.2.6",
            "wasi:http/types@0.3.0",
            "wasi:nn/graph@0.2.0-rc-2024-10-28",
            "fermyon:spin/llm@2.0.0",
        ] {
            assert!(provided(ok), "{ok}");
        }
        for missing in [
            "wasi:http/types@0.3.0-rc-2026-03-15",
            "wasi:io/streams@0.3.0",
            "wasi:keyvalue/store@0.2.0-draft",
            "fermyon:spin/variables@2.0.0",
            "fermyon:spin/key-value@2.0.0",
            "wasmlm:llm/generation@0.1.0",
            "wasi:nn/graph@0.2.0-rc-2024-08-19",
            "no-version",
        ] {
            assert!(!provided(missing), "{missing}");
        }
    }
}
