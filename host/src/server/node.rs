//! The node's state: the runtime, each served model with its slots and warm state, metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::config::{ModelConfig, NodeConfig};
use super::error::ApiError;
use super::metrics::{Metrics, ModelGauges};
use super::slots::SlotPool;
use crate::backend::KvDType;
use crate::bindings::exports::wasmlm::llm::models::ModelInfo;
use crate::device::DeviceSpec;
use crate::models;
use crate::runtime::{default_options, Runtime};

/// Where a model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmState {
    Cold,
    Loading,
    Warm,
    Failed,
}

impl WarmState {
    /// The name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            WarmState::Cold => "cold",
            WarmState::Loading => "loading",
            WarmState::Warm => "warm",
            WarmState::Failed => "failed",
        }
    }
}

/// A model's warm state with its load time or failure.
#[derive(Debug, Clone)]
pub struct Warmth {
    pub state: WarmState,
    pub load_secs: Option<f64>,
    pub error: Option<String>,
}

/// A model this node serves.
pub struct ServedModel {
    pub config: ModelConfig,
    pub pool: Arc<SlotPool>,
    pub warmth: watch::Sender<Warmth>,
    /// Facts from the component, once warm.
    pub info: Mutex<Option<ModelInfo>>,
    /// "generator" or "embedding", once loaded.
    pub kind: Mutex<Option<&'static str>>,
}

impl ServedModel {
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.config.spec.name
    }

    /// Its warm state now.
    pub fn warmth(&self) -> Warmth {
        self.warmth.borrow().clone()
    }

    /// Facts from the component, when warm.
    pub fn info(&self) -> Option<ModelInfo> {
        self.info.lock().ok().and_then(|i| i.clone())
    }

    /// "generator" or "embedding", once loaded.
    pub fn kind(&self) -> Option<&'static str> {
        self.kind.lock().ok().and_then(|k| *k)
    }
}

/// One node.
pub struct Node {
    pub config: NodeConfig,
    pub runtime: Arc<Runtime>,
    pub models: Vec<Arc<ServedModel>>,
    pub metrics: Metrics,
    in_flight: AtomicUsize,
    pub started: Instant,
    /// The wasm HTTP apps served beside the API, once loaded.
    pub apps: std::sync::OnceLock<Arc<super::apps::AppHost>>,
}

/// Counts a request in flight while alive.
pub struct InFlight(Arc<Node>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    /// A node serving `config`'s models with `runtime`; nothing loaded yet.
    pub fn new(config: NodeConfig, runtime: Arc<Runtime>) -> Arc<Self> {
        let models = config
            .models
            .iter()
            .map(|m| {
                Arc::new(ServedModel {
                    config: m.clone(),
                    pool: SlotPool::new(config.queue),
                    warmth: watch::Sender::new(Warmth {
                        state: WarmState::Cold,
                        load_secs: None,
                        error: None,
                    }),
                    info: Mutex::new(None),
                    kind: Mutex::new(None),
                })
            })
            .collect();
        Arc::new(Self {
            config,
            runtime,
            models,
            metrics: Metrics::default(),
            in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            apps: std::sync::OnceLock::new(),
        })
    }

    /// Names of the served models.
    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name().to_string()).collect()
    }

    /// The model served as `name` (its name or an alias).
    pub fn find(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .iter()
            .find(|m| m.name() == name || m.config.aliases.iter().any(|a| a == name))
            .cloned()
            .ok_or_else(|| ApiError::unknown_model(name, &self.model_names()))
    }

    /// Marks a request in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests being served or waiting.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Waits until `m` is warm, loading it if it is cold (or failed, with `retry`). Returns
    /// the load time.
    pub async fn ensure_warm(
        self: &Arc<Self>,
        m: &Arc<ServedModel>,
        retry: bool,
    ) -> Result<f64, ApiError> {
        let mut rx = m.warmth.subscribe();
        loop {
            let w = rx.borrow_and_update().clone();
            match w.state {
                WarmState::Warm => return Ok(w.load_secs.unwrap_or(0.0)),
                WarmState::Failed if !retry => {
                    return Err(ApiError::unavailable(format!(
                        "The model '{}' failed to load: {}",
                        m.name(),
                        w.error.unwrap_or_default()
                    )))
                }
                WarmState::Loading => {
                    if rx.changed().await.is_err() {
                        return Err(ApiError::internal("the node is shutting down"));
                    }
                }
                WarmState::Cold | WarmState::Failed => {
                    let claimed = m.warmth.send_if_modified(|s| {
                        let free = matches!(s.state, WarmState::Cold | WarmState::Failed);
                        if free {
                            s.state = WarmState::Loading;
                            s.error = None;
                        }
                        free
                    });
                    if claimed {
                        // The load finishes and publishes its outcome even if this request
                        // is dropped meanwhile.
                        let node = self.clone();
                        let model = m.clone();
                        tokio::task::spawn_blocking(move || node.load(&model));
                    }
                    // A failed load retried here must not be re-tried in a loop.
                    let w = rx.wait_for(|s| s.state != WarmState::Loading).await;
                    match w.map(|w| w.clone()) {
                        Ok(w) if w.state == WarmState::Warm => {
                            return Ok(w.load_secs.unwrap_or(0.0))
                        }
                        Ok(w) => {
                            return Err(ApiError::unavailable(format!(
                                "The model '{}' failed to load: {}",
                                m.name(),
                                w.error.unwrap_or_default()
                            )))
                        }
                        Err(_) => return Err(ApiError::internal("the node is shutting down")),
                    }
                }
            }
        }
    }

    /// Loads `m`, makes its slots and runs one real forward pass; publishes the outcome.
    fn load(&self, m: &ServedModel) {
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_inner(m)))
            .unwrap_or_else(|_| Err("the loader panicked".into()));
        let secs = t0.elapsed().as_secs_f64();
        m.warmth.send_modify(|s| match outcome {
            Ok(()) => {
                s.state = WarmState::Warm;
                s.load_secs = Some(secs);
            }
            Err(e) => {
                s.state = WarmState::Failed;
                s.error = Some(e);
            }
        });
    }

    fn load_inner(&self, m: &ServedModel) -> Result<(), String> {
        let name = m.name();
        let device = m.config.device.open().map_err(|e| e.to_string())?;
        let loaded = models::load_one(
            &m.config.spec,
            m.config.context_length,
            m.config.kv_cache,
            &device,
        )
        .map_err(|e| e.to_string())?;
        let kind = loaded.weights.kind();
        if let Ok(mut k) = m.kind.lock() {
            *k = Some(kind);
        }
        self.runtime.add_model(name, loaded);
        let have = m.pool.total();
        for i in have..m.config.slots {
            let mut inst = self
                .runtime
                .create_instance(name)
                .map_err(|e| e.to_string())?;
            if i == 0 {
                let info = inst.describe(name).map_err(|e| e.to_string())?;
                if let Ok(mut slot) = m.info.lock() {
                    *slot = Some(info);
                }
                // One real pass through the whole path: first requests pay no lazy set-up.
                if kind == "embedding" {
                    inst.embed(name, &["Hello".to_string()])
                        .map_err(|e| e.to_string())?;
                } else {
                    let options = crate::bindings::exports::wasmlm::llm::types::SamplingOptions {
                        max_tokens: Some(1),
                        temperature: Some(0.0),
                        ..default_options()
                    };
                    let mut stream = inst
                        .complete(name, "Hello", &options)
                        .map_err(|e| e.to_string())?;
                    while stream.next_chunk().map_err(|e| e.to_string())?.is_some() {}
                }
            }
            m.pool.add(inst);
        }
        // One pooled instance for tokenize / detokenize / apply-template.
        drop(self.runtime.instance(name).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// Gauges of every model for `/metrics`.
    pub fn gauges(&self) -> Vec<ModelGauges> {
        self.models
            .iter()
            .map(|m| ModelGauges {
                model: m.name().to_string(),
                slots_total: m.pool.total(),
                slots_busy: m.pool.busy(),
                queue_depth: m.pool.queued(),
                warm: m.warmth().state == WarmState::Warm,
            })
            .collect()
    }

    /// A model's `/v1/models` entry (with our extra fields).
    pub fn model_json(&self, m: &ServedModel) -> Value {
        let w = m.warmth();
        let context = m
            .info()
            .map(|i| i.context_length as usize)
            .or(m.config.context_length);
        json!({
            "id": m.name(),
            "object": "model",
            "created": self.started_unix(),
            "owned_by": "wasmlm",
            "aliases": m.config.aliases,
            "device": m.config.device.to_string(),
            "context_length": context,
            "state": w.state.as_str(),
            "slots": m.config.slots,
            "kind": m.kind(),
        })
    }

    /// The devices models run on, GPUs first (the gateway takes the first GPU's model as the
    /// node's device), then the CPU, which always serves the guests.
    fn devices(&self) -> Vec<Value> {
        let mut gpus: Vec<DeviceSpec> = self
            .models
            .iter()
            .map(|m| m.config.device)
            .filter(|d| *d != DeviceSpec::Cpu)
            .collect();
        gpus.sort();
        gpus.dedup();
        gpus.into_iter()
            .chain(std::iter::once(DeviceSpec::Cpu))
            .map(DeviceSpec::describe)
            .collect()
    }

    /// Unix time the node started.
    pub fn started_unix(&self) -> u64 {
        unix_now().saturating_sub(self.started.elapsed().as_secs())
    }

    /// The `/node` inventory.
    pub fn inventory(&self) -> Value {
        let models: Vec<Value> = self
            .models
            .iter()
            .map(|m| {
                let w = m.warmth();
                json!({
                    "id": m.name(),
                    "aliases": m.config.aliases,
                    "device": m.config.device.to_string(),
                    "state": w.state.as_str(),
                    "load_time_ms": w.load_secs.map(|s| s * 1e3),
                    "error": w.error,
                    "context_length": m.info().map(|i| i.context_length),
                    "kv_cache": m.config.kv_cache.unwrap_or_else(KvDType::from_env).name(),
                    "slots": {"total": m.config.slots, "busy": m.pool.busy()},
                    "queue_depth": m.pool.queued(),
                    "prefix_cache": m.pool.cached().iter()
                        .map(|(id, bytes)| json!({"slot": id, "text_bytes": bytes}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let queue: usize = self.models.iter().map(|m| m.pool.queued()).sum();
        json!({
            "id": self.config.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "labels": self.config.labels,
            "devices": self.devices(),
            "models": models,
            "in_flight": self.in_flight(),
            "queue_depth": queue,
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
