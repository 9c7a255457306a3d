//! The wasmtime side: one engine, the LLM component compiled once (and cached on disk), the
//! `wasi:nn` + WASI linker, and pools of warm component instances per model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceAny, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_nn::wit::{WasiNnCtx, WasiNnView};
use wasmtime_wasi_nn::{Backend, Graph, GraphRegistry, Registry};

use crate::backend::{CandleBackend, CandleGraph, LoadedModel};
use crate::bindings::exports::fermyon::spin::llm::{
    Error as SpinError, InferencingParams as SpinParams, InferencingResult as SpinResult,
};
use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::models::ModelInfo;
use crate::bindings::exports::wasmlm::llm::types::{
    ChatContext, Error as GuestError, Message, Role, SamplingOptions, Usage,
};
use crate::bindings::{LlmHost, LlmHostPre};

/// The component built with this host (see `build.rs`).
pub static EMBEDDED_COMPONENT: &[u8] = include_bytes!(env!("WASMLM_EMBEDDED_COMPONENT"));

/// Memory one guest instance may use.
const GUEST_MEMORY_LIMIT: usize = 2 << 30;
/// Bytes a guest may move through one host call (the metadata document is a few MB).
const HOSTCALL_FUEL: usize = 256 << 20;

/// What can go wrong running the component.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The component answered with an error.
    #[error("{}", describe_guest_error(.0))]
    Guest(GuestError),
    /// The engine, the linker or the guest itself failed (a trap).
    #[error("wasm runtime: {0:#}")]
    Wasm(wasmtime::Error),
    #[error("no model named '{name}' is loaded (loaded: {loaded})")]
    UnknownModel { name: String, loaded: String },
    #[error("component cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<wasmtime::Error> for RuntimeError {
    fn from(e: wasmtime::Error) -> Self {
        RuntimeError::Wasm(e)
    }
}

/// One line for a guest error.
pub fn describe_guest_error(e: &GuestError) -> String {
    match e {
        GuestError::ModelNotFound(m) => format!("model not found: {m}"),
        GuestError::InvalidInput(m) => format!("invalid input: {m}"),
        GuestError::ContextOverflow(c) => format!(
            "the prompt has {} tokens but the model's context holds {}",
            c.prompt_tokens, c.context_length
        ),
        GuestError::UnsupportedModel(m) => format!("unsupported model: {m}"),
        GuestError::Backend(m) => format!("backend: {m}"),
    }
}

/// Sampling options with every field unset: the component's defaults (OpenAI's semantics).
pub fn default_options() -> SamplingOptions {
    SamplingOptions {
        max_tokens: None,
        temperature: None,
        top_k: None,
        top_p: None,
        min_p: None,
        repeat_penalty: None,
        repeat_last_n: None,
        presence_penalty: None,
        frequency_penalty: None,
        seed: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        include_stop: None,
        top_logprobs: None,
        ignore_eos: None,
        choices: Vec::new(),
        logit_bias: Vec::new(),
        format: None,
        reasoning_budget: None,
    }
}

/// A plain message: `role` said `content`.
pub fn message(role: Role, content: impl Into<String>) -> Message {
    Message {
        role,
        content: content.into(),
        reasoning: None,
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

/// A chat with nothing but its messages.
pub fn no_context() -> ChatContext {
    ChatContext {
        tools_json: None,
        template_kwargs_json: None,
        tool_choice: None,
        parallel_tool_calls: None,
    }
}

/// Per-instance state: WASI (nothing granted), wasi-nn, limits.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    nn: WasiNnCtx,
    limits: StoreLimits,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The sandbox every guest gets: no preopened directories, no environment, no arguments, no
/// network; stdout and stderr are discarded except stderr, which goes to the host's stderr
/// for panics.
pub fn sandboxed_wasi() -> WasiCtx {
    WasiCtxBuilder::new()
        .inherit_stderr()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

/// The models the host serves, by name, for `wasi:nn`'s `load-by-name`.
#[derive(Clone)]
struct NamedGraphs(Arc<HashMap<String, Graph>>);

impl GraphRegistry for NamedGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        Arc::get_mut(&mut self.0).and_then(|m| m.get_mut(name))
    }
}

/// The engine, the compiled component and the loaded models.
pub struct Runtime {
    engine: Engine,
    pre: LlmHostPre<GuestState>,
    /// Models load while the runtime serves others (a node warms models on demand); an
    /// instance sees the models loaded when it was created.
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
    idle: Mutex<HashMap<String, Vec<Instance>>>,
    /// Bumped whenever a model is added: a `wasi:nn` context made before sees a stale set.
    generation: std::sync::atomic::AtomicU64,
}

impl Runtime {
    /// A runtime serving `models` with the component `wasm`, compiled through `cache_dir`.
    pub fn new(
        wasm: &[u8],
        models: HashMap<String, Arc<LoadedModel>>,
        cache_dir: Option<&Path>,
    ) -> Result<Self, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // `perf` names the guest's functions from /tmp/perf-<pid>.map (docs/perf.md).
        if std::env::var_os("WASMLM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let component = load_component(&engine, wasm, cache_dir)?;
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut GuestState| {
            WasiNnView::new(&mut s.table, &mut s.nn)
        })?;
        let pre = LlmHostPre::new(linker.instantiate_pre(&component)?)?;
        Ok(Self {
            engine,
            pre,
            models: RwLock::new(models),
            idle: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Serves `model` under `name` from now on (replacing a model of that name).
    pub fn add_model(&self, name: &str, model: Arc<LoadedModel>) {
        if let Ok(mut m) = self.models.write() {
            m.insert(name.to_string(), model);
        }
        if let Ok(mut pools) = self.idle.lock() {
            pools.remove(name);
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes whenever the set of loaded models does.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A loaded model.
    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, RuntimeError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models.get(name).cloned().ok_or_else(|| {
            let mut loaded: Vec<&str> = models.keys().map(String::as_str).collect();
            loaded.sort();
            RuntimeError::UnknownModel {
                name: name.to_string(),
                loaded: loaded.join(", "),
            }
        })
    }

    /// The engine (for embedders adding their own components).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A warm instance for `model`: an idle one from the pool, or a new one set up for it.
    /// It goes back to the pool when dropped.
    pub fn instance(&self, model: &str) -> Result<PooledInstance<'_>, RuntimeError> {
        self.model(model)?;
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut pools| pools.get_mut(model).and_then(Vec::pop));
        let inst = match idle {
            Some(i) => i,
            None => self.create_instance(model)?,
        };
        Ok(PooledInstance {
            runtime: self,
            model: model.to_string(),
            inst: Some(inst),
        })
    }

    /// A new instance, outside the pool, with `model` set up in it (tokenizer and template
    /// parsed once here, not per request).
    pub fn create_instance(&self, model: &str) -> Result<Instance, RuntimeError> {
        self.model(model)?;
        let mut inst = self.new_instance()?;
        inst.describe(model)?;
        Ok(inst)
    }

    /// A `wasi:nn` context whose `load-by-name` finds the loaded models that `allowed` admits.
    pub fn nn_ctx(&self, allowed: impl Fn(&str) -> bool) -> WasiNnCtx {
        let backends: Vec<Backend> = vec![Backend::from(CandleBackend)];
        let graphs = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(name, _)| allowed(name))
            .map(|(name, m)| (name.clone(), CandleGraph::graph(m.clone())))
            .collect();
        WasiNnCtx::new(backends, Registry::from(NamedGraphs(Arc::new(graphs))))
    }

    fn new_instance(&self) -> Result<Instance, RuntimeError> {
        let state = GuestState {
            wasi: sandboxed_wasi(),
            table: ResourceTable::new(),
            nn: self.nn_ctx(|_| true),
            limits: StoreLimitsBuilder::new()
                .memory_size(GUEST_MEMORY_LIMIT)
                .build(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        let api = self.pre.instantiate(&mut store)?;
        Ok(Instance {
            store,
            api,
            poisoned: false,
        })
    }
}

/// Compiles the component, or loads the compiled form cached for this engine.
fn load_component(
    engine: &Engine,
    wasm: &[u8],
    cache_dir: Option<&Path>,
) -> Result<Component, RuntimeError> {
    compile_cached(engine, wasm, cache_dir, "llm")
}

/// Compiles `wasm` for `engine`, or loads the compiled form cached in `cache_dir` under a name
/// starting with `stem` and keyed by the bytes and the engine's settings.
pub fn compile_cached(
    engine: &Engine,
    wasm: &[u8],
    cache_dir: Option<&Path>,
    stem: &str,
) -> Result<Component, RuntimeError> {
    let Some(dir) = cache_dir else {
        return Ok(Component::new(engine, wasm)?);
    };
    let mut h = Sha256::new();
    h.update(wasm);
    {
        use std::hash::{Hash, Hasher};
        let mut eh = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut eh);
        h.update(eh.finish().to_le_bytes());
    }
    let key: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("{stem}-{key}.cwasm"));
    if path.exists() {
        // SAFETY: the file is one this function wrote for an engine with the same
        // compatibility hash; a damaged file fails validation and is rebuilt below.
        if let Ok(c) = unsafe { Component::deserialize_file(engine, &path) } {
            return Ok(c);
        }
    }
    let compiled = engine.precompile_component(wasm)?;
    let cache_err = |source| RuntimeError::Cache {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(cache_err)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &compiled).map_err(cache_err)?;
    std::fs::rename(&tmp, &path).map_err(cache_err)?;
    // SAFETY: `compiled` was produced by this engine just now.
    Ok(unsafe { Component::deserialize(engine, &compiled) }?)
}

/// One component instance with its store.
pub struct Instance {
    store: Store<GuestState>,
    api: LlmHost,
    /// Set after a trap: the instance's state can no longer be trusted.
    poisoned: bool,
}

/// An instance borrowed from a [`Runtime`]'s pool.
pub struct PooledInstance<'a> {
    runtime: &'a Runtime,
    model: String,
    inst: Option<Instance>,
}

impl std::ops::Deref for PooledInstance<'_> {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        self.inst.as_ref().expect("instance present until drop")
    }
}

impl std::ops::DerefMut for PooledInstance<'_> {
    fn deref_mut(&mut self) -> &mut Instance {
        self.inst.as_mut().expect("instance present until drop")
    }
}

impl Drop for PooledInstance<'_> {
    fn drop(&mut self) {
        if let Some(inst) = self.inst.take() {
            if !inst.poisoned {
                if let Ok(mut pools) = self.runtime.idle.lock() {
                    pools.entry(self.model.clone()).or_default().push(inst);
                }
            }
        }
    }
}

impl Instance {
    /// False once a trap left the instance's state untrustworthy: drop it and make another.
    pub fn is_healthy(&self) -> bool {
        !self.poisoned
    }

    /// Runs a call into the guest; a trap poisons the instance, whose state can no longer be
    /// trusted.
    fn guard<R>(
        &mut self,
        f: impl FnOnce(&LlmHost, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, RuntimeError> {
        f(&self.api, &mut self.store).map_err(|trap| {
            self.poisoned = true;
            RuntimeError::Wasm(trap)
        })
    }

    /// Runs a call whose result carries the component's own error type.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&LlmHost, &mut Store<GuestState>) -> wasmtime::Result<Result<R, GuestError>>,
    ) -> Result<R, RuntimeError> {
        self.guard(f)?.map_err(RuntimeError::Guest)
    }

    /// Runs a call that starts a generation, and wraps its stream resource.
    fn start(
        &mut self,
        f: impl FnOnce(
            &LlmHost,
            &mut Store<GuestState>,
        ) -> wasmtime::Result<Result<ResourceAny, GuestError>>,
    ) -> Result<Stream<'_>, RuntimeError> {
        let res = self.call(f)?;
        Ok(Stream {
            inst: self,
            res: Some(res),
        })
    }

    /// Facts about `model`; sets the model up in this instance on first use.
    pub fn describe(&mut self, model: &str) -> Result<ModelInfo, RuntimeError> {
        self.call(|api, store| api.wasmlm_llm_models().call_describe(store, model))
    }

    /// Token ids of `text`.
    pub fn tokenize(
        &mut self,
        model: &str,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>, RuntimeError> {
        self.call(|api, store| {
            api.wasmlm_llm_tokenization()
                .call_tokenize(store, model, text, parse_special)
        })
    }

    /// Text of `tokens`.
    pub fn detokenize(&mut self, model: &str, tokens: &[u32]) -> Result<String, RuntimeError> {
        self.call(|api, store| {
            api.wasmlm_llm_tokenization()
                .call_detokenize(store, model, tokens)
        })
    }

    /// `messages` rendered with the model's chat template.
    pub fn apply_template(
        &mut self,
        model: &str,
        messages: &[Message],
        context: &ChatContext,
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        self.call(|api, store| {
            api.wasmlm_llm_tokenization().call_apply_template(
                store,
                model,
                messages,
                context,
                add_generation_prompt,
            )
        })
    }

    /// Sentence embeddings of `inputs`.
    pub fn embed(
        &mut self,
        model: &str,
        inputs: &[String],
    ) -> Result<crate::bindings::exports::wasmlm::llm::embeddings::EmbeddingResult, RuntimeError>
    {
        self.call(|api, store| api.wasmlm_llm_embeddings().call_embed(store, model, inputs))
    }

    /// Spin's `fermyon:spin/llm.infer`, as a Spin app would call it.
    pub fn spin_infer(
        &mut self,
        model: &str,
        prompt: &str,
        params: Option<SpinParams>,
    ) -> Result<Result<SpinResult, SpinError>, RuntimeError> {
        self.guard(|api, store| {
            api.fermyon_spin_llm()
                .call_infer(store, &model.to_string(), prompt, params)
        })
    }

    /// Starts a chat completion.
    pub fn chat(
        &mut self,
        model: &str,
        messages: &[Message],
        context: &ChatContext,
        options: &SamplingOptions,
    ) -> Result<Stream<'_>, RuntimeError> {
        self.start(|api, store| {
            api.wasmlm_llm_generation()
                .call_chat(store, model, messages, context, options)
        })
    }

    /// Starts a raw text completion.
    pub fn complete(
        &mut self,
        model: &str,
        prompt: &str,
        options: &SamplingOptions,
    ) -> Result<Stream<'_>, RuntimeError> {
        self.start(|api, store| {
            api.wasmlm_llm_generation()
                .call_complete(store, model, prompt, options)
        })
    }

    /// Starts a completion of a prompt given as token ids.
    pub fn complete_tokens(
        &mut self,
        model: &str,
        prompt: &[u32],
        options: &SamplingOptions,
    ) -> Result<Stream<'_>, RuntimeError> {
        self.start(|api, store| {
            api.wasmlm_llm_generation()
                .call_complete_tokens(store, model, prompt, options)
        })
    }
}

/// A running generation inside an instance.
pub struct Stream<'a> {
    inst: &'a mut Instance,
    res: Option<ResourceAny>,
}

impl Stream<'_> {
    fn resource(&self) -> ResourceAny {
        self.res.expect("stream resource present until drop")
    }

    /// The next chunk, or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, RuntimeError> {
        let res = self.resource();
        self.inst.call(|api, store| {
            api.wasmlm_llm_generation()
                .completion_stream()
                .call_next(store, res)
        })
    }

    /// Asks the generation to end.
    pub fn cancel(&mut self) -> Result<(), RuntimeError> {
        let res = self.resource();
        self.inst.guard(|api, store| {
            api.wasmlm_llm_generation()
                .completion_stream()
                .call_cancel(store, res)
        })
    }

    /// Token counts so far.
    pub fn usage(&mut self) -> Result<Usage, RuntimeError> {
        let res = self.resource();
        self.inst.guard(|api, store| {
            api.wasmlm_llm_generation()
                .completion_stream()
                .call_usage(store, res)
        })
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        if let Some(res) = self.res.take() {
            if res.resource_drop(&mut self.inst.store).is_err() {
                self.inst.poisoned = true;
            }
        }
    }
}
