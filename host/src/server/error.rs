//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! codes the official SDKs map to their exception classes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::bindings::exports::wasmlm::llm::types::Error as GuestError;
use crate::runtime::{describe_guest_error, RuntimeError};

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: a request the server cannot serve as written.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::bad_request(message)
        }
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "Missing or invalid API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
            )
        }
    }

    /// 404 for a route this node does not have.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 404 for a model this node does not serve; the message lists the ones it does.
    pub fn unknown_model(name: &str, served: &[String]) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model '{name}' does not exist on this node (served: {}).",
                    served.join(", ")
                ),
            )
        }
    }

    /// 429: every slot busy and the queue full.
    pub fn busy(model: &str) -> Self {
        Self::too_busy(format!(
            "Every slot of '{model}' is busy and its queue is full; retry shortly."
        ))
    }

    /// 429: an app is serving as many requests as it may.
    pub fn app_busy(route: &str, limit: usize) -> Self {
        Self::too_busy(format!(
            "The app at {route} is serving its limit of {limit} requests; retry shortly."
        ))
    }

    fn too_busy(message: String) -> Self {
        Self {
            code: Some("server_busy"),
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503: the model is not available (still loading, or it failed to load).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("model_unavailable"),
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: a real fault inside the node.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: Some("internal_error"),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
        }
    }

    /// The error with its parameter named as another API names it: `names` maps this
    /// API's first path segment (`messages` of `messages[2].content`) to the other's.
    pub fn renamed(mut self, names: &[(&str, &str)]) -> Self {
        self.param = self.param.map(|p| {
            let (head, rest) = p.split_at(p.find(['[', '.']).unwrap_or(p.len()));
            let head = names
                .iter()
                .find(|(from, _)| *from == head)
                .map_or(head, |(_, to)| to);
            format!("{head}{rest}")
        });
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::Guest(g) => match g {
                GuestError::InvalidInput(m) => ApiError::bad_request(m.clone()),
                GuestError::ContextOverflow(c) => ApiError {
                    code: Some("context_length_exceeded"),
                    param: Some("messages".into()),
                    ..ApiError::bad_request(format!(
                        "This model's maximum context length is {} tokens. However, your \
                         request has {} prompt tokens. Please reduce the length of the prompt.",
                        c.context_length, c.prompt_tokens
                    ))
                },
                GuestError::ModelNotFound(m) => {
                    ApiError::not_found(format!("model not found: {m}"))
                }
                GuestError::UnsupportedModel(_) => ApiError::bad_request(describe_guest_error(g)),
                GuestError::Backend(_) => ApiError::internal(describe_guest_error(g)),
            },
            RuntimeError::UnknownModel { name, loaded } => ApiError::unknown_model(
                name,
                &loaded.split(", ").map(String::from).collect::<Vec<_>>(),
            ),
            RuntimeError::Wasm(_) | RuntimeError::Cache { .. } => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}
