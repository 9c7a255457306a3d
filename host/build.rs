//! Builds the LLM component for `wasm32-wasip2` and hands its path to the host, which embeds it:
//! `cargo build --release` at the root is the whole build, from any folder and any target dir.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMPONENT_PACKAGE: &str = "wasmlm-llm-component";
const COMPONENT_FILE: &str = "wasmlm_llm_component.wasm";
/// A guest that tries to escape the sandbox, for the host's tests (not embedded in the binary).
const PROBE_PACKAGE: &str = "wasmlm-sandbox-probe";
const PROBE_FILE: &str = "wasmlm-sandbox-probe.wasm";
/// The example apps (`components/examples/`) and the tests' spin-sdk 5 app, built with the
/// component so that `cargo build` leaves them ready for `wasmlm serve --app`.
const APP_PACKAGES: &[&str] = &[
    "wasmlm-example-ask",
    "wasmlm-example-summarize",
    "wasmlm-test-spin5-app",
];
const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for watched in ["components", "wit", "tests/apps", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=WASMLM_COMPONENT_WASM");

    // A prebuilt component (e.g. from a CI artifact) skips the nested build.
    let wasm = match env::var_os("WASMLM_COMPONENT_WASM") {
        Some(path) => {
            // The sandbox and app tests report that the guests were not built.
            println!("cargo:rustc-env=WASMLM_SANDBOX_PROBE=");
            println!("cargo:rustc-env=WASMLM_GUEST_DIR=");
            PathBuf::from(path)
        }
        None => {
            let release = build_guests(&root, &out_dir);
            println!(
                "cargo:rustc-env=WASMLM_SANDBOX_PROBE={}",
                release.join(PROBE_FILE).display()
            );
            println!("cargo:rustc-env=WASMLM_GUEST_DIR={}", release.display());
            release.join(COMPONENT_FILE)
        }
    };
    let embedded = out_dir.join(COMPONENT_FILE);
    std::fs::copy(&wasm, &embedded)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", wasm.display(), embedded.display()));
    println!(
        "cargo:rustc-env=WASMLM_EMBEDDED_COMPONENT={}",
        embedded.display()
    );
}

/// Builds the guests; returns the folder that holds them.
fn build_guests(root: &Path, out_dir: &Path) -> PathBuf {
    // Our own target dir beside the outer one (OUT_DIR is <target>/<profile>/build/<pkg>/out):
    // the outer cargo holds the lock of its profile dir, and one component build serves every
    // profile of the host.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-component"))
        .unwrap_or_else(|| out_dir.join("wasm-component"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", WASM_TARGET])
        .args(["-p", COMPONENT_PACKAGE, "-p", PROBE_PACKAGE]);
    for app in APP_PACKAGES {
        cmd.args(["-p", app]);
    }
    cmd.arg("--target-dir").arg(&target_dir);
    // The outer build's flags are for the host CPU; clippy's wrapper is not wanted either.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build the guests: {e}"));
    if !status.success() {
        panic!(
            "building the guests for {WASM_TARGET} failed (see above). If the target is missing, \
             install it with: rustup target add {WASM_TARGET}"
        );
    }
    target_dir.join(WASM_TARGET).join("release")
}
