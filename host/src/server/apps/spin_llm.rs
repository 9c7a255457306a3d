//! An app's `fermyon:spin/llm@2.0.0` import, served by the node's warm llm component instances:
//! `infer` borrows a slot of the model (as a chat request would) and calls the component's own
//! `fermyon:spin/llm` export, so Spin's semantics (raw prompt, Spin's defaults, separate token
//! counts) live in one place, the component.

use std::collections::HashSet;
use std::sync::Arc;

use crate::bindings::exports::fermyon::spin::llm as guest;
use crate::server::node::{Node, ServedModel};
use crate::server::slots::{ready_instance, AcquireError};

wasmtime::component::bindgen!({
    inline: "package wasmlm:app-host; world spin-llm { import fermyon:spin/llm@2.0.0; }",
    path: "../wit",
    imports: { default: async },
});

use fermyon::spin::llm::{
    EmbeddingsResult, EmbeddingsUsage, Error, Host, InferencingParams, InferencingResult,
    InferencingUsage,
};

/// What one app may reach: the node, and the models its allowlist names (`None`: all).
#[derive(Clone)]
pub struct LlmAccess {
    pub node: Arc<Node>,
    pub allowed: Option<Arc<HashSet<String>>>,
}

impl LlmAccess {
    /// The model served as `name`, if this app may use it.
    pub fn model(&self, name: &str) -> Option<Arc<ServedModel>> {
        let m = self.node.find(name).ok()?;
        let ok = match &self.allowed {
            None => true,
            Some(list) => list.contains(name) || list.contains(m.name()),
        };
        ok.then_some(m)
    }

    /// Whether `model` (a runtime name) is one this app may load through `wasi:nn`.
    pub fn allows_graph(&self, model: &str) -> bool {
        self.model(model).is_some_and(|m| m.name() == model)
    }

    /// A warm model of `kind` this app may use, or Spin's error.
    async fn warm(&self, name: &str, kind: &str) -> Result<Arc<ServedModel>, Error> {
        let m = self.model(name).ok_or(Error::ModelNotSupported)?;
        self.node
            .ensure_warm(&m, false)
            .await
            .map_err(|e| Error::RuntimeError(e.message))?;
        if m.kind() != Some(kind) {
            return Err(Error::ModelNotSupported);
        }
        Ok(m)
    }
}

impl Host for LlmAccess {
    async fn infer(
        &mut self,
        model: String,
        prompt: String,
        params: Option<InferencingParams>,
    ) -> Result<InferencingResult, Error> {
        let m = self.warm(&model, "generator").await?;
        let mut lease = m.pool.acquire(&prompt).await.map_err(|e| match e {
            AcquireError::Busy => Error::RuntimeError(format!(
                "every slot of '{}' is busy and its queue is full; try again later",
                m.name()
            )),
            AcquireError::Closed => Error::RuntimeError("the node is shutting down".into()),
        })?;
        let name = m.name().to_string();
        let params = params.map(|p| guest::InferencingParams {
            max_tokens: p.max_tokens,
            repeat_penalty: p.repeat_penalty,
            repeat_penalty_last_n_token_count: p.repeat_penalty_last_n_token_count,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        });
        // Apps run on a thread of their own (see `AppHost::handle`): blocking it for the
        // generation keeps the node's async workers free.
        let slot = &mut *lease;
        slot.affinity.clone_from(&prompt);
        let inst = ready_instance(&mut slot.instance, &self.node.runtime, &name)
            .map_err(|e| Error::RuntimeError(e.to_string()))?;
        let r = match inst.spin_infer(&name, &prompt, params) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(from_guest(e)),
            Err(e) => return Err(Error::RuntimeError(e.to_string())),
        };
        slot.affinity.push_str(&r.text);
        self.node.metrics.tokens(
            &name,
            r.usage.prompt_token_count,
            0,
            r.usage.generated_token_count,
        );
        Ok(InferencingResult {
            text: r.text,
            usage: InferencingUsage {
                prompt_token_count: r.usage.prompt_token_count,
                generated_token_count: r.usage.generated_token_count,
            },
        })
    }

    async fn generate_embeddings(
        &mut self,
        model: String,
        text: Vec<String>,
    ) -> Result<EmbeddingsResult, Error> {
        let m = self.warm(&model, "embedding").await?;
        let mut inst = self
            .node
            .runtime
            .instance(m.name())
            .map_err(|e| Error::RuntimeError(e.to_string()))?;
        let r = inst.embed(m.name(), &text).map_err(|e| match e {
            crate::runtime::RuntimeError::Guest(g) => match g {
                crate::bindings::exports::wasmlm::llm::types::Error::InvalidInput(m) => {
                    Error::InvalidInput(m)
                }
                other => Error::RuntimeError(crate::runtime::describe_guest_error(&other)),
            },
            other => Error::RuntimeError(other.to_string()),
        })?;
        Ok(EmbeddingsResult {
            embeddings: r.embeddings,
            usage: EmbeddingsUsage {
                prompt_token_count: r.prompt_tokens,
            },
        })
    }
}

fn from_guest(e: guest::Error) -> Error {
    match e {
        guest::Error::ModelNotSupported => Error::ModelNotSupported,
        guest::Error::RuntimeError(m) => Error::RuntimeError(m),
        guest::Error::InvalidInput(m) => Error::InvalidInput(m),
    }
}
