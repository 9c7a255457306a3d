//! `wasmlm`: run LLM components on this machine.

mod bench_app;
mod bench_serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use wasmlm_host::backend::{KvDType, LoadedModel, Sequence};
use wasmlm_host::bindings::exports::wasmlm::llm::types::{OutputFormat, Role, SamplingOptions};
use wasmlm_host::device::DeviceSpec;
use wasmlm_host::models::{self, ModelSpec, KNOWN_MODELS};
use wasmlm_host::runtime::{default_options, message, no_context, Runtime, EMBEDDED_COMPONENT};
use wasmlm_host::server::{self, config::NodeConfig, config::Overrides};

/// Run LLMs as WebAssembly components: the generation loop runs in a sandboxed wasm component,
/// the forward pass natively behind wasi:nn.
#[derive(Parser)]
#[command(name = "wasmlm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, streaming the text to stdout and a summary line to stderr.
    Run(RunArgs),
    /// Serve the OpenAI-compatible API (see docs/api.md).
    Serve(ServeArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed natively and through the component, in one run.
    Bench(BenchArgs),
    /// Measure the node's HTTP path against the in-process one, JSON mode against free text,
    /// and decode throughput with several concurrent streams, in one run.
    BenchServe(BenchServeArgs),
    /// Measure a wasm app's fermyon:spin/llm path against the node's OpenAI endpoint, in one run.
    BenchApp(BenchAppArgs),
    /// Plug the llm component into an app that imports wasmlm:llm: the result imports only
    /// wasi:nn and WASI (plus what the app imports besides), and runs with `serve --app`.
    Compose(ComposeArgs),
    /// Fetch the known models (default: all) into the model cache, or Hub repos
    /// (`hf:OWNER/REPO[@REV][:FILE-OR-QUANT]`) into the Hugging Face cache.
    Pull {
        /// Names of models to fetch.
        names: Vec<String>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model as NAME=PATH, PATH to a GGUF file or model folder, a known name (default:
    /// smollm2, fetched if missing), or a Hub repo hf:OWNER/REPO[:QUANT]. Models are cached in
    /// $WASMLM_MODELS or ~/.cache/wasmlm/models (Hub repos in $HF_HOME).
    #[arg(long, short)]
    model: Option<String>,
    /// Context length in tokens (default: the model's own).
    #[arg(long)]
    context: Option<usize>,
    /// KV cache type on the CPU: f16 (default), f32 or q8_0 (about half of f16's memory).
    #[arg(long)]
    kv_cache: Option<KvDType>,
    /// CPU threads for the forward pass (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Use this component file instead of the embedded one.
    #[arg(long, hide = true)]
    component: Option<PathBuf>,
    /// A Jinja chat template file to use instead of the model's own (or for a model without).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Device for the forward pass: cpu, or cuda:N in a build with CUDA.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Top-k cut (0 disables).
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    /// Top-p (nucleus) cut.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Min-p cut.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repeat penalty over the last 64 tokens (1 is off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed: the same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// System message (otherwise the template's default, if it has one).
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as is, without the chat template (for base models).
    #[arg(long)]
    raw: bool,
    /// JSON mode: the answer is one JSON object, and ends where it closes.
    #[arg(long, conflicts_with = "json_schema")]
    json: bool,
    /// The answer is one JSON object that follows this JSON Schema (its text).
    #[arg(long)]
    json_schema: Option<String>,
    /// The whole answer matches this regular expression (Rust `regex` syntax).
    #[arg(long, conflicts_with_all = ["json", "json_schema"])]
    regex: Option<String>,
    /// The prompt.
    prompt: String,
}

#[derive(Args)]
struct ServeArgs {
    /// Node config (TOML): listen address, labels, API keys, models.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model to serve as NAME=PATH, PATH or a known name (repeatable; default: smollm2).
    #[arg(long, short)]
    model: Vec<String>,
    /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Concurrent generations per model (default 2).
    #[arg(long)]
    slots: Option<usize>,
    /// Requests that may wait for a slot, per model, before 429 (default 16).
    #[arg(long)]
    queue: Option<usize>,
    /// Context length in tokens (default: the model's own).
    #[arg(long)]
    context: Option<usize>,
    /// KV cache type of every model on the CPU: f16 (default), f32 or q8_0 (about half of
    /// f16's memory; over the config file's `kv_cache`).
    #[arg(long)]
    kv_cache: Option<KvDType>,
    /// Accepted API key (repeatable; also WASMLM_API_KEY). Without one the API is open.
    #[arg(long = "api-key", env = "WASMLM_API_KEY")]
    api_keys: Vec<String>,
    /// Label KEY=VALUE reported in /node (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// This node's id in /node and the gateway's `x-served-by` (default: the host name).
    #[arg(long = "node-id")]
    node_id: Option<String>,
    /// CPU threads for the forward pass (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Device for the models named by --model (the config file sets its own per model):
    /// cpu, or cuda:N in a build with CUDA.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Use this component file instead of the embedded one.
    #[arg(long, hide = true)]
    component: Option<PathBuf>,
    /// A Jinja chat template file to use instead of the model's own (or for a model without).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// A wasm HTTP app as ROUTE=PATH (repeatable): requests to ROUTE and below it go to the
    /// app's wasi:http handler; its fermyon:spin/llm import is served by this node's models.
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Start apps that import interfaces this node does not provide; calling one traps.
    #[arg(long)]
    allow_unknown_imports: bool,
}

#[derive(Args)]
struct BenchAppArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The app on /ask (default: the spin-sdk 7 example built with this binary).
    #[arg(long)]
    app: Option<PathBuf>,
    /// Tokens to generate per request in the decode comparison.
    #[arg(long, default_value_t = 64)]
    gen_tokens: u32,
    /// Rounds of the decode comparison (three times as many latency pairs).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Args)]
struct ComposeArgs {
    /// An app component that imports wasmlm:llm interfaces (world llm-app).
    app: PathBuf,
    /// Where to write the composed component.
    #[arg(short, long)]
    output: PathBuf,
    /// Plug in this llm component instead of the embedded one.
    #[arg(long)]
    llm: Option<PathBuf>,
}

#[derive(Args)]
struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    gen_tokens: u32,
    /// Rounds of the HTTP-overhead comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    streams: Vec<usize>,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Turn special-token text such as <|im_start|> into its token.
    #[arg(long)]
    special: bool,
    /// The text.
    text: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Rounds; each runs both paths, and the best of each is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Serve(a) => serve(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Bench(a) => bench(a),
        Command::BenchServe(a) => bench_serve(a),
        Command::Compose(a) => compose(a),
        Command::BenchApp(a) => bench_app::run(
            a.model.model.unwrap_or_else(|| "smollm2".into()),
            a.app,
            a.gen_tokens,
            a.rounds,
        ),
        Command::Pull { names } => pull(&names),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("wasmlm: error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Sizes the forward pass's thread pool.
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its work by RAYON_NUM_THREADS; the pool must match it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        wasmlm_kernels::pool::set_threads(n);
    }
    Ok(())
}

/// The component to run: `path`, or the embedded one.
fn component_wasm(path: Option<&PathBuf>) -> Result<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).with_context(|| format!("reading component {}", p.display())),
        None => Ok(EMBEDDED_COMPONENT.to_vec()),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    set_threads(a.threads)?;
    let overrides = Overrides {
        listen: a.listen,
        models: a.model,
        slots: a.slots,
        queue: a.queue,
        context_length: a.context,
        kv_cache: a.kv_cache,
        api_keys: a.api_keys,
        labels: a.labels,
        node_id: a.node_id,
        chat_template: a.chat_template,
        device: a.device,
        apps: a.apps,
        allow_unknown_imports: a.allow_unknown_imports,
    };
    let config = NodeConfig::load(a.config.as_deref(), overrides, &models::models_dir())?;
    let wasm = component_wasm(a.component.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(server::serve(config, wasm))?;
    Ok(())
}

fn compose(a: ComposeArgs) -> Result<()> {
    let llm = component_wasm(a.llm.as_ref())?;
    let composed = wasmlm_host::compose::compose(&a.app, &llm)?;
    std::fs::write(&a.output, &composed)
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!(
        "wasmlm: wrote {} ({} bytes)",
        a.output.display(),
        composed.len()
    );
    Ok(())
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    if a.gen_tokens < 2 || a.rounds == 0 || a.streams.contains(&0) {
        bail!("need --gen-tokens >= 2, --rounds >= 1 and stream counts >= 1");
    }
    let (runtime, model) = start(&a.model)?;
    let spec = format!("{model}={}", runtime_model_path(&a.model)?.display());
    bench_serve::run(
        runtime,
        model,
        spec,
        a.model.device,
        a.model.kv_cache,
        a.gen_tokens,
        a.rounds,
        &a.streams,
    )
}

/// The file of the model `a` names.
fn runtime_model_path(a: &ModelArgs) -> Result<PathBuf> {
    let dir = models::models_dir();
    let spec = match &a.model {
        Some(s) => ModelSpec::parse(s, &dir)?,
        None => ModelSpec::default_model(&dir),
    };
    Ok(spec.resolve()?)
}

/// Loads the model and the runtime; returns the runtime and the model's name.
fn start(a: &ModelArgs) -> Result<(Runtime, String)> {
    set_threads(a.threads)?;
    let dir = models::models_dir();
    let spec = match &a.model {
        Some(s) => ModelSpec::parse(s, &dir)?,
        None => ModelSpec::default_model(&dir),
    };
    let spec = ModelSpec {
        chat_template: a.chat_template.clone(),
        ..spec
    };
    let device = a.device.open()?;
    let model = models::load_one(&spec, a.context, a.kv_cache, &device)?;
    let loaded = std::collections::HashMap::from([(spec.name.clone(), model)]);
    let wasm = component_wasm(a.component.as_ref())?;
    let cache = models::cache_dir().join("components");
    let runtime = Runtime::new(&wasm, loaded, Some(&cache))?;
    Ok((runtime, spec.name))
}

fn run(a: RunArgs) -> Result<()> {
    let (runtime, model) = start(&a.model)?;
    let mut inst = runtime.instance(&model)?;
    let options = SamplingOptions {
        max_tokens: Some(a.max_tokens),
        temperature: Some(a.temperature),
        top_k: Some(a.top_k),
        top_p: Some(a.top_p),
        min_p: Some(a.min_p),
        repeat_penalty: Some(a.repeat_penalty),
        seed: a.seed,
        stop: a.stop.clone(),
        format: match (&a.json_schema, a.json, &a.regex) {
            (Some(schema), _, _) => Some(OutputFormat::JsonSchema(schema.clone())),
            (None, true, _) => Some(OutputFormat::JsonObject),
            (None, false, Some(regex)) => Some(OutputFormat::Regex(regex.clone())),
            (None, false, None) => None,
        },
        ..default_options()
    };
    let start = Instant::now();
    let mut stream = if a.raw {
        inst.complete(&model, &a.prompt, &options)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(message(Role::System, s.clone()));
        }
        messages.push(message(Role::User, a.prompt.clone()));
        inst.chat(&model, &messages, &no_context(), &options)?
    };
    let mut out = std::io::stdout().lock();
    let (mut first, mut last) = (None, None);
    while let Some(chunk) = stream.next_chunk()? {
        if !chunk.tokens.is_empty() {
            let now = start.elapsed();
            first.get_or_insert(now);
            last = Some(now);
        }
        out.write_all(chunk.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    let usage = stream.usage()?;
    let ttft = first.unwrap_or_default();
    let decode = match (first, last) {
        (Some(f), Some(l)) if usage.completion_tokens > 1 && l > f => {
            (usage.completion_tokens - 1) as f64 / (l - f).as_secs_f64()
        }
        _ => 0.0,
    };
    let prefill = (usage.prompt_tokens - usage.cached_tokens) as f64 / ttft.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt_tokens={} generated_tokens={} ttft_ms={:.1} prefill_tok_s={:.1} decode_tok_s={:.1} peak_rss_mb={:.1}",
        usage.prompt_tokens,
        usage.completion_tokens,
        ttft.as_secs_f64() * 1e3,
        prefill,
        decode,
        peak_rss_mb()
    );
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let (runtime, model) = start(&a.model)?;
    let ids = runtime
        .instance(&model)?
        .tokenize(&model, &a.text, a.special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn pull(names: &[String]) -> Result<()> {
    let dir = models::models_dir();
    // Hub repos are fetched as named; the rest must be known models.
    let (hub, names): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| {
        n.starts_with(wasmlm_host::hub::PREFIX) || wasmlm_host::hub::HubRef::looks_like_repo(n)
    });
    for n in &hub {
        let spec = ModelSpec::parse(n, &dir)?;
        println!("{}\t{}", spec.name, spec.resolve()?.display());
    }
    if !hub.is_empty() && names.is_empty() {
        return Ok(());
    }
    if let Some(unknown) = names
        .iter()
        .find(|n| !KNOWN_MODELS.iter().any(|k| k.name == n.as_str()))
    {
        bail!(
            "unknown model '{unknown}' (known: {})",
            KNOWN_MODELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for k in KNOWN_MODELS {
        if names.is_empty() || names.iter().any(|n| *n == k.name) {
            models::ensure_fetched(k, &dir)?;
            println!("{}\t{}", k.name, ModelSpec::known(k, &dir).path.display());
        }
    }
    Ok(())
}

/// Peak resident memory of this process, from /proc (0 where there is none).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Timings of one generation.
#[derive(Clone, Copy, Default)]
struct Timing {
    prefill: Duration,
    decode: Duration,
}

/// Prompt and decode straight through the backend, greedy, as the component would.
fn bench_native(model: &Arc<LoadedModel>, prompt: &[u32], gen: usize) -> Result<Timing> {
    let mut seq = Sequence::new(model.clone());
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for chunk in prompt.chunks(512) {
        logits = seq.extend(chunk).map_err(anyhow::Error::msg)?;
    }
    let mut token = argmax(&logits);
    let t1 = Instant::now();
    for _ in 1..gen {
        logits = seq.extend(&[token]).map_err(anyhow::Error::msg)?;
        token = argmax(&logits);
    }
    Ok(Timing {
        prefill: t1 - t0,
        decode: t1.elapsed(),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

fn bench_component(runtime: &Runtime, model: &str, prompt: &[u32], gen: usize) -> Result<Timing> {
    let mut inst = runtime.instance(model)?;
    let options = SamplingOptions {
        max_tokens: Some(gen as u32),
        temperature: Some(0.0),
        ignore_eos: Some(true),
        ..default_options()
    };
    let t0 = Instant::now();
    let mut stream = inst.complete_tokens(model, prompt, &options)?;
    let mut first = None;
    let mut n = 0;
    while let Some(chunk) = stream.next_chunk()? {
        n += chunk.tokens.len();
        first.get_or_insert_with(Instant::now);
    }
    let usage = stream.usage()?;
    if usage.cached_tokens != 0 {
        bail!("benchmark prompt hit the prefix cache");
    }
    if n != gen {
        bail!("component generated {n} tokens, expected {gen}");
    }
    let t1 = first.unwrap_or(t0);
    Ok(Timing {
        prefill: t1 - t0,
        decode: t1.elapsed(),
    })
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens < 2 || a.rounds == 0 {
        bail!("need --prompt-tokens >= 1, --gen-tokens >= 2 and --rounds >= 1");
    }
    let (runtime, model) = start(&a.model)?;
    let loaded = runtime.model(&model)?.clone();
    let text =
        "The history of computing is a story of abstraction: each layer hides the one beneath it, \
                so that people can think about problems instead of machines. ";
    let unit = runtime.instance(&model)?.tokenize(&model, text, false)?;
    let base: Vec<u32> = unit.iter().copied().cycle().take(a.prompt_tokens).collect();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or("1".into(), |n| n.to_string())
    });
    println!(
        "model={model} prompt_tokens={} gen_tokens={} threads={threads} rounds={}",
        a.prompt_tokens, a.gen_tokens, a.rounds
    );
    let mut best_native = (0.0f64, 0.0f64);
    let mut best_comp = (0.0f64, 0.0f64);
    // Each round runs both paths back to back; the median of the per-round ratios is the
    // figure that survives a noisy, shared machine.
    let (mut prefill_ratios, mut decode_ratios) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        // A different first token each round keeps the component's prefix cache out of it.
        let mut prompt = base.clone();
        prompt[0] = unit[round % unit.len()];
        let rate = |t: Timing| {
            (
                a.prompt_tokens as f64 / t.prefill.as_secs_f64(),
                (a.gen_tokens - 1) as f64 / t.decode.as_secs_f64(),
            )
        };
        let n = rate(bench_native(&loaded, &prompt, a.gen_tokens)?);
        let c = rate(bench_component(&runtime, &model, &prompt, a.gen_tokens)?);
        println!(
            "round={round} native_prefill_tok_s={:.1} native_decode_tok_s={:.1} component_prefill_tok_s={:.1} component_decode_tok_s={:.1}",
            n.0, n.1, c.0, c.1
        );
        prefill_ratios.push(c.0 / n.0);
        decode_ratios.push(c.1 / n.1);
        best_native = (best_native.0.max(n.0), best_native.1.max(n.1));
        best_comp = (best_comp.0.max(c.0), best_comp.1.max(c.1));
    }
    println!(
        "best native_prefill_tok_s={:.1} native_decode_tok_s={:.1} component_prefill_tok_s={:.1} component_decode_tok_s={:.1}",
        best_native.0, best_native.1, best_comp.0, best_comp.1
    );
    println!(
        "median ratio component/native prefill={:.3} decode={:.3} peak_rss_mb={:.1}",
        median(&mut prefill_ratios),
        median(&mut decode_ratios),
        peak_rss_mb()
    );
    Ok(())
}
