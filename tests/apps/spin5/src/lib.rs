//! A spin-sdk 5 app for the host's tests: the `wasi:http/incoming-handler@0.2.0` world older
//! Spin apps export. `POST .../infer` calls `llm::infer_with_options` (or `llm::infer` when no
//! `params` are given), `POST .../embed` calls `llm::generate_embeddings`, and `GET .../secret`
//! calls `variables::get`, an import wasmlm does not provide (so the app only starts with
//! `--allow-unknown-imports`, and that route traps).
#![cfg(target_arch = "wasm32")]

use serde::Deserialize;
use serde_json::json;
use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;
use spin_sdk::llm::{self, InferencingModel, InferencingParams};

#[derive(Deserialize)]
struct Infer {
    model: String,
    prompt: String,
    params: Option<Params>,
}

#[derive(Deserialize)]
struct Params {
    max_tokens: u32,
    temperature: f32,
}

#[derive(Deserialize)]
struct Embed {
    model: String,
    input: Vec<String>,
}

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    let path = req.path().to_string();
    if path.ends_with("/secret") {
        let v = spin_sdk::variables::get("secret")?;
        return Ok(reply(200, json!({"secret": v})));
    }
    if path.ends_with("/embed") {
        let e: Embed = serde_json::from_slice(req.body())?;
        return Ok(
            match llm::generate_embeddings(llm::EmbeddingModel::Other(&e.model), &e.input) {
                Ok(r) => reply(
                    200,
                    json!({"embeddings": r.embeddings, "prompt_token_count": r.usage.prompt_token_count}),
                ),
                Err(e) => reply(400, json!({"error": format!("{e:?}")})),
            },
        );
    }
    let i: Infer = serde_json::from_slice(req.body())?;
    let model = InferencingModel::Other(&i.model);
    let result = match i.params {
        Some(p) => llm::infer_with_options(
            model,
            &i.prompt,
            InferencingParams {
                max_tokens: p.max_tokens,
                temperature: p.temperature,
                ..InferencingParams::default()
            },
        ),
        None => llm::infer(model, &i.prompt),
    };
    Ok(match result {
        Ok(r) => reply(
            200,
            json!({
                "text": r.text,
                "prompt_token_count": r.usage.prompt_token_count,
                "generated_token_count": r.usage.generated_token_count,
            }),
        ),
        Err(e) => reply(400, json!({"error": format!("{e:?}")})),
    })
}

fn reply(status: u16, body: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.to_string())
        .build()
}
