//! `wasmlm serve --app ROUTE=PATH`: wasm HTTP apps served beside the OpenAI API.
//!
//! An app is a `wasi:http` handler component, in either world spin-sdk builds:
//! `wasi:http/handler@0.3.0` (spin-sdk 7, WASIp3) or `wasi:http/incoming-handler@0.2.x`
//! (spin-sdk 5 and older, and anything built with the `wasip2` crate). Its
//! `fermyon:spin/llm@2.0.0` import is served by the node's warm llm instances
//! ([`spin_llm`]); its `wasi:nn` import (an app composed with the llm component) sees the
//! node's loaded models. Each request gets a fresh instance, as Spin does (composed apps keep
//! warm ones: their llm set-up is most of a short request), run on a thread of its own so that
//! long model calls never hold the node's async workers.

pub mod imports;
pub mod spin_llm;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Limited, StreamBody};
use tokio::sync::{mpsc, oneshot, Semaphore};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p3::bindings::{Service, ServicePre};
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};
use wasmtime_wasi_nn::wit::{WasiNnCtx, WasiNnView};

use self::spin_llm::LlmAccess;
use super::config::AppConfig;
use super::error::ApiError;
use super::node::Node;
use crate::runtime::{compile_cached, sandboxed_wasi};

/// Memory one app instance may use (a composed app holds the llm component's too).
const APP_MEMORY_LIMIT: usize = 2 << 30;
/// Bytes an app may move through one host call (a composed app reads the model's metadata).
const HOSTCALL_FUEL: usize = 256 << 20;
/// Largest request body an app is handed.
const APP_BODY_LIMIT: usize = 32 << 20;
/// Longest an app may run for one request (a long generation on a CPU takes minutes).
const APP_TIMEOUT: Duration = Duration::from_secs(600);
/// How often running apps yield to the executor, so that a timeout can stop one that loops.
const EPOCH_TICK: Duration = Duration::from_millis(50);

/// Why an app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("app {route}: cannot read {path}: {source}")]
    Read {
        route: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("app {route}: {path} is not a component wasmtime can run: {message}")]
    Compile {
        route: String,
        path: PathBuf,
        message: String,
    },
    #[error(
        "app {route}: {path} imports what this node does not provide: {}{hint} \
         (run it anyway, trapping when one is called, with --allow-unknown-imports)",
        names.join(", ")
    )]
    UnknownImports {
        route: String,
        path: PathBuf,
        names: Vec<String>,
        hint: String,
    },
    #[error(
        "app {route}: {path} exports no HTTP handler (wasi:http/handler@0.3.0 or \
         wasi:http/incoming-handler@0.2.x); it exports: {}",
        exports.join(", ")
    )]
    NotHandler {
        route: String,
        path: PathBuf,
        exports: Vec<String>,
    },
    #[error("app {route}: {message}")]
    Link { route: String, message: String },
}

/// The request handler an app exports.
enum Handler {
    /// `wasi:http/incoming-handler@0.2.x`.
    P2(ProxyPre<AppState>),
    /// `wasi:http/handler@0.3.0`.
    P3(ServicePre<AppState>),
}

/// An instance of an app's handler.
enum Bound {
    P2(Proxy),
    P3(Service),
}

/// An instance kept between requests, with the store it lives in.
struct Warm {
    store: Store<AppState>,
    bound: Bound,
    /// The runtime's model generation its `wasi:nn` context was made in.
    generation: u64,
}

/// One app, compiled and linked.
pub struct App {
    /// The path it serves (and everything below it).
    pub route: String,
    pub path: PathBuf,
    handler: Handler,
    access: LlmAccess,
    /// Requests it may serve at once.
    permits: Arc<Semaphore>,
    limit: usize,
    /// Whether instances outlive their request.
    pub reuse: bool,
    idle: Mutex<Vec<Warm>>,
}

impl App {
    /// The world the app exports, for the start-up line.
    pub fn world(&self) -> &'static str {
        match self.handler {
            Handler::P2(_) => "wasi:http/incoming-handler@0.2",
            Handler::P3(_) => "wasi:http/handler@0.3.0",
        }
    }

    /// Whether a request for `path` belongs to this app.
    fn serves(&self, path: &str) -> bool {
        self.route == "/"
            || path == self.route
            || path
                .strip_prefix(&self.route)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// Per-request state of an app instance.
pub struct AppState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: NoOutbound,
    table: ResourceTable,
    nn: WasiNnCtx,
    limits: StoreLimits,
    llm: LlmAccess,
}

impl WasiView for AppState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for AppState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Apps make no outbound HTTP requests: the sandbox grants no network.
struct NoOutbound;

impl WasiHttpHooks for NoOutbound {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// The apps of one node and the engine they run on.
pub struct AppHost {
    engine: Engine,
    node: Arc<Node>,
    apps: Vec<Arc<App>>,
}

/// A response body as the apps produce it.
type AppBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;
/// What a request's thread hands back: the response head and its streaming body, or why the
/// app answered with an error of its own.
type Answer = Result<http::Response<AppBody>, String>;

impl AppHost {
    /// Compiles and links `configs`' apps for `node`; `None` when there are none.
    pub fn load(
        node: &Arc<Node>,
        configs: &[AppConfig],
        cache_dir: Option<&Path>,
    ) -> Result<Option<Arc<Self>>, AppError> {
        if configs.is_empty() {
            return Ok(None);
        }
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.wasm_component_model_async(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| AppError::Link {
            route: configs[0].route.clone(),
            message: format!("engine: {e:#}"),
        })?;
        let apps = configs
            .iter()
            .map(|c| load_app(&engine, node, c, cache_dir).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        // Epoch ticks make running guests yield, so that a timed-out request can be dropped.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasmlm-app-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| AppError::Link {
                route: configs[0].route.clone(),
                message: format!("starting the epoch thread: {e}"),
            })?;
        Ok(Some(Arc::new(Self {
            engine,
            node: node.clone(),
            apps,
        })))
    }

    /// The apps, in the order configured.
    pub fn apps(&self) -> &[Arc<App>] {
        &self.apps
    }

    /// The app serving `path`: the one with the longest matching route.
    pub fn find(&self, path: &str) -> Option<Arc<App>> {
        self.apps
            .iter()
            .filter(|a| a.serves(path))
            .max_by_key(|a| a.route.len())
            .cloned()
    }

    /// Serves `req` with `app`, on a thread of its own.
    pub async fn handle(self: &Arc<Self>, app: Arc<App>, req: Request) -> Response {
        let Ok(permit) = app.permits.clone().try_acquire_owned() else {
            return ApiError::app_busy(&app.route, app.limit).into_response();
        };
        let req = spin_request(&app, req);
        let (tx, rx) = oneshot::channel::<Answer>();
        let host = self.clone();
        let rt = tokio::runtime::Handle::current();
        let route = app.route.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _counted = host.node.enter();
            rt.block_on(async {
                match tokio::time::timeout(APP_TIMEOUT, host.run(&app, req, tx)).await {
                    Ok(r) => r,
                    Err(_) => Err(wasmtime::Error::msg(format!(
                        "the app ran past {} s",
                        APP_TIMEOUT.as_secs()
                    ))),
                }
            })
        });
        match rx.await {
            Ok(Ok(res)) => {
                // A trap after the head was sent can only end the body early: log it.
                let logged = route.clone();
                tokio::spawn(async move {
                    if let Ok(Err(e)) = task.await {
                        eprintln!("wasmlm: app {logged}: {e:#}");
                    }
                });
                res.map(|b| Body::new(b.map_err(|e| std::io::Error::other(e.to_string()))))
                    .into_response()
            }
            Ok(Err(code)) => {
                ApiError::internal(format!("the app at {route} failed: {code}")).into_response()
            }
            // The app ended (or trapped) without answering. The client gets the cause; the
            // log also gets the wasm backtrace.
            Err(_) => {
                let why = match task.await {
                    Ok(Ok(())) => "it returned without setting a response".to_string(),
                    Ok(Err(e)) => {
                        eprintln!("wasmlm: app {route}: {e:#}");
                        e.root_cause().to_string()
                    }
                    Err(e) => format!("its thread failed: {e}"),
                };
                ApiError::internal(format!("the app at {route} failed: {why}")).into_response()
            }
        }
    }

    /// A store for one request of `app`.
    fn store(&self, app: &App) -> Store<AppState> {
        let access = app.access.clone();
        let nn = self.node.runtime.nn_ctx(|name| access.allows_graph(name));
        let state = AppState {
            wasi: sandboxed_wasi(),
            http: WasiHttpCtx::new(),
            hooks: NoOutbound,
            table: ResourceTable::new(),
            nn,
            limits: StoreLimitsBuilder::new()
                .memory_size(APP_MEMORY_LIMIT)
                .build(),
            llm: access,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    /// A warm instance of `app` if one is kept, else a new one.
    async fn instance(&self, app: &App) -> wasmtime::Result<Warm> {
        let generation = self.node.runtime.generation();
        let kept = app
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            .filter(|w| w.generation == generation);
        if let Some(w) = kept {
            return Ok(w);
        }
        let mut store = self.store(app);
        let bound = match &app.handler {
            Handler::P2(pre) => Bound::P2(pre.instantiate_async(&mut store).await?),
            Handler::P3(pre) => Bound::P3(pre.instantiate_async(&mut store).await?),
        };
        Ok(Warm {
            store,
            bound,
            generation,
        })
    }

    /// Runs one request; the answer goes to `tx` as soon as the app sets it, while its body
    /// keeps streaming. The instance is kept for the next request when the app reuses them
    /// and this one ran to its end.
    async fn run(
        &self,
        app: &App,
        req: http::Request<AppBody>,
        tx: oneshot::Sender<Answer>,
    ) -> wasmtime::Result<()> {
        let mut warm = self.instance(app).await?;
        let clean = serve(&mut warm, req, tx).await?;
        if clean && app.reuse {
            if let Ok(mut idle) = app.idle.lock() {
                idle.push(warm);
            }
        }
        Ok(())
    }
}

/// One request on `warm`; true when it ran to its end (the body fully sent), so that the
/// instance holds nothing of it.
async fn serve(
    warm: &mut Warm,
    req: http::Request<AppBody>,
    tx: oneshot::Sender<Answer>,
) -> wasmtime::Result<bool> {
    let store = &mut warm.store;
    match &warm.bound {
        Bound::P2(proxy) => {
            use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
            let req = store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, req)?;
            let out = store
                .data_mut()
                .http()
                .new_response_outparam_from_callback(move |r| {
                    let _ = tx.send(r.map_err(|code| format!("{code:?}")));
                })?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut *store, req, out)
                .await?;
            Ok(true)
        }
        Bound::P3(service) => {
            let (request, request_io) =
                wasmtime_wasi_http::p3::Request::from_http(&mut NoOutbound, req);
            // Reports errors reading the request body; the app sees them itself.
            tokio::spawn(request_io);
            store
                .run_concurrent(async |accessor| -> wasmtime::Result<bool> {
                    let res = match service.handle(accessor, request).await? {
                        Ok(res) => res,
                        Err(code) => {
                            let _ = tx.send(Err(format!("{code:?}")));
                            return Ok(true);
                        }
                    };
                    let res = accessor.with(|a| res.into_http(a, async { Ok(()) }))?;
                    let (head, mut body) = res.into_parts();
                    // The body is the guest's stream: it moves only while this store runs,
                    // so frames are pumped from here to the client.
                    let (frames, rx) = mpsc::channel(8);
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv().await.map(|f| (f, rx))
                    });
                    let streamed = StreamBody::new(stream).boxed_unsync();
                    if tx
                        .send(Ok(http::Response::from_parts(head, streamed)))
                        .is_err()
                    {
                        return Ok(false);
                    }
                    while let Some(frame) = body.frame().await {
                        if frames.send(frame).await.is_err() {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                })
                .await?
        }
    }
}

/// Compiles one app, checks its imports and links it.
fn load_app(
    engine: &Engine,
    node: &Arc<Node>,
    c: &AppConfig,
    cache_dir: Option<&Path>,
) -> Result<App, AppError> {
    let wasm = std::fs::read(&c.path).map_err(|source| AppError::Read {
        route: c.route.clone(),
        path: c.path.clone(),
        source,
    })?;
    let component =
        compile_cached(engine, &wasm, cache_dir, "app").map_err(|e| AppError::Compile {
            route: c.route.clone(),
            path: c.path.clone(),
            message: e.to_string(),
        })?;
    let link_err = |e: wasmtime::Error| AppError::Link {
        route: c.route.clone(),
        message: format!("{e:#}"),
    };
    let missing = imports::missing(engine, &component);
    if !missing.is_empty() && !c.allow_unknown_imports {
        let hint = if missing.iter().any(|m| m.starts_with("wasmlm:llm/")) {
            format!(
                " (an llm-app imports wasmlm:llm: compose it with the llm component first: \
                 wasmlm compose {} -o composed.wasm)",
                c.path.display()
            )
        } else {
            String::new()
        };
        return Err(AppError::UnknownImports {
            route: c.route.clone(),
            path: c.path.clone(),
            names: missing,
            hint,
        });
    }
    let mut linker: Linker<AppState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
    wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(link_err)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link_err)?;
    wasmtime_wasi_http::p3::add_to_linker(&mut linker).map_err(link_err)?;
    wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut AppState| {
        WasiNnView::new(&mut s.table, &mut s.nn)
    })
    .map_err(link_err)?;
    spin_llm::fermyon::spin::llm::add_to_linker::<_, HasSelf<LlmAccess>>(
        &mut linker,
        |s: &mut AppState| &mut s.llm,
    )
    .map_err(link_err)?;
    imports::stub(&mut linker, engine, &component, &missing).map_err(link_err)?;
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_string())
        .collect();
    let pre = linker.instantiate_pre(&component).map_err(link_err)?;
    let handler = if exports.iter().any(|e| e == "wasi:http/handler@0.3.0") {
        Handler::P3(ServicePre::new(pre).map_err(link_err)?)
    } else if exports
        .iter()
        .any(|e| e.starts_with("wasi:http/incoming-handler@0.2."))
    {
        Handler::P2(ProxyPre::new(pre).map_err(link_err)?)
    } else {
        return Err(AppError::NotHandler {
            route: c.route.clone(),
            path: c.path.clone(),
            exports,
        });
    };
    let reuse = c.reuse_instances.unwrap_or_else(|| {
        component
            .component_type()
            .imports(engine)
            .any(|(name, _)| name.starts_with("wasi:nn/"))
    });
    let allowed = c
        .models
        .as_ref()
        .map(|m| Arc::new(m.iter().cloned().collect::<HashSet<_>>()));
    Ok(App {
        route: c.route.clone(),
        path: c.path.clone(),
        handler,
        access: LlmAccess {
            node: node.clone(),
            allowed,
        },
        permits: Arc::new(Semaphore::new(c.max_concurrent)),
        limit: c.max_concurrent,
        reuse,
        idle: Mutex::new(Vec::new()),
    })
}

/// The request as the app sees it: an absolute URL, the body capped, and the headers Spin's
/// HTTP trigger adds (`spin-path-info` is the path below the route).
fn spin_request(app: &App, req: Request) -> http::Request<AppBody> {
    let (mut parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        .unwrap_or("localhost")
        .to_string();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let full = format!("http://{host}{path_and_query}");
    if let Ok(uri) = full.parse::<http::Uri>() {
        parts.uri = uri;
    }
    let path = parts.uri.path().to_string();
    let base = if app.route == "/" { "" } else { &app.route };
    let info = path.strip_prefix(base).unwrap_or("").to_string();
    let wildcard = format!("{base}/...");
    for (name, value) in [
        ("spin-full-url", full.as_str()),
        ("spin-path-info", info.as_str()),
        ("spin-matched-route", wildcard.as_str()),
        ("spin-raw-component-route", wildcard.as_str()),
        ("spin-component-route", base),
        ("spin-base-path", "/"),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            parts.headers.insert(name, v);
        }
    }
    let body = Limited::new(body, APP_BODY_LIMIT)
        .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))
        .boxed_unsync();
    http::Request::from_parts(parts, body)
}
