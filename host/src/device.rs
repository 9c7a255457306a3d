//! Where a model runs: `cpu`, or `cuda:N` in a build with the `cuda` feature.
//!
//! The spelling is the node config's `device = "..."` and the CLI's `--device`; `open` turns it
//! into the candle device the backend loads weights onto, and `describe` into the `/node`
//! inventory entry (for a GPU: the driver's name and memory), which the gateway matches on.

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

/// A device a model can be placed on.
/// Ordered CPU first, then GPUs by ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DeviceSpec {
    /// The host CPU (the row pass over our own kernels).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal (candle's tensor pass; KV cache in device memory).
    Cuda(usize),
}

/// A device that cannot be named or opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}' (use cpu, cuda or cuda:N)")]
    Unknown(String),
    #[error(
        "device '{0}' needs a wasmlm built with CUDA (scripts/build-cuda.sh); this one runs on cpu only"
    )]
    NotBuilt(DeviceSpec),
    #[error("cannot open {spec}: {message}")]
    Open { spec: DeviceSpec, message: String },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Whether this build can run models there at all (a GPU may still be missing at run time).
    pub fn built(self) -> bool {
        match self {
            DeviceSpec::Cpu => true,
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// The candle device for this spec (creates the CUDA context and stream on first use).
    pub fn open(self) -> Result<candle_core::Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => {
                candle_core::Device::new_cuda(n).map_err(|e| DeviceError::Open {
                    spec: self,
                    message: crate::backend::plain_message(&e),
                })
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(DeviceError::NotBuilt(self)),
        }
    }

    /// The `/node` inventory entry: what the device is, as its driver tells.
    pub fn describe(self) -> Value {
        match self {
            DeviceSpec::Cpu => cpu_entry(),
            DeviceSpec::Cuda(n) => gpu_entry(n),
        }
    }
}

/// The CPU: its model name, cores and memory.
fn cpu_entry() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("cpu", |(_, v)| v.trim());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    json!({
        "id": "cpu",
        "kind": "cpu",
        "name": name,
        "memory_bytes": memory,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// A GPU as the CUDA driver reports it; `gpu` is the short model name the gateway matches.
fn gpu_entry(ordinal: usize) -> Value {
    let id = DeviceSpec::Cuda(ordinal).to_string();
    match gpu_facts(ordinal) {
        Ok(g) => json!({
            "id": id,
            "kind": "cuda",
            "name": g.name,
            "gpu": short_gpu_name(&g.name),
            "memory_bytes": g.total,
            "memory_free_bytes": g.free,
            "compute_capability": format!("{}.{}", g.capability.0, g.capability.1),
        }),
        Err(e) => json!({"id": id, "kind": "cuda", "error": e.to_string()}),
    }
}

/// What the driver says of one GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GpuFacts {
    name: String,
    total: u64,
    free: u64,
    capability: (i32, i32),
}

#[cfg(feature = "cuda")]
fn gpu_facts(ordinal: usize) -> Result<GpuFacts, DeviceError> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let err = |e: &dyn fmt::Display| DeviceError::Open {
        spec: DeviceSpec::Cuda(ordinal),
        message: e.to_string(),
    };
    let ctx = CudaContext::new(ordinal).map_err(|e| err(&e))?;
    let name = ctx.name().map_err(|e| err(&e))?;
    let total = ctx.total_mem().map_err(|e| err(&e))? as u64;
    let free = ctx.mem_get_info().map_err(|e| err(&e))?.0 as u64;
    let capability = ctx.compute_capability().map_err(|e| err(&e))?;
    Ok(GpuFacts {
        name,
        total,
        free,
        capability,
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_facts(ordinal: usize) -> Result<GpuFacts, DeviceError> {
    Err(DeviceError::NotBuilt(DeviceSpec::Cuda(ordinal)))
}

/// The model in a driver's GPU name, as operators and the gateway's catalog spell it:
/// "NVIDIA H100 80GB HBM3" → "H100", "NVIDIA A100-SXM4-80GB" → "A100", "Tesla T4" → "T4",
/// "NVIDIA GeForce RTX 4090" → "4090", "NVIDIA L40S" → "L40S".
pub fn short_gpu_name(name: &str) -> String {
    const BRANDS: &[&str] = &["nvidia", "tesla", "geforce", "quadro", "rtx"];
    name.split_whitespace()
        .find(|w| !BRANDS.contains(&w.to_ascii_lowercase().as_str()))
        .and_then(|w| w.split('-').next())
        .filter(|w| !w.is_empty())
        .unwrap_or(name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_refuse_nonsense() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().ok(), Some(d), "{s}");
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        let mut order = vec![DeviceSpec::Cuda(10), DeviceSpec::Cuda(2), DeviceSpec::Cpu];
        order.sort();
        assert_eq!(
            order,
            [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Cuda(10)]
        );
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x", "metal"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.to_string().contains("unknown device"), "{bad}: {e}");
        }
    }

    #[test]
    fn without_the_feature_cuda_is_a_clear_error() {
        assert!(DeviceSpec::Cpu.open().is_ok_and(|d| d.is_cpu()));
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("scripts/build-cuda.sh"), "{e}");
            assert!(!DeviceSpec::Cuda(0).built());
            assert_eq!(DeviceSpec::Cuda(0).describe()["kind"], "cuda");
        }
    }

    #[test]
    fn gpu_names_shorten_to_what_catalogs_use() {
        for (full, short) in [
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA A100-SXM4-80GB", "A100"),
            ("NVIDIA L40S", "L40S"),
            ("NVIDIA A10G", "A10G"),
            ("Tesla T4", "T4"),
            ("NVIDIA GeForce RTX 4090", "4090"),
            ("NVIDIA", "NVIDIA"),
        ] {
            assert_eq!(short_gpu_name(full), short, "{full}");
        }
    }
}
