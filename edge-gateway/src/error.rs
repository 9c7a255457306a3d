//! Errors in OpenAI's shape, as the node answers them, so a client cannot tell the two apart.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::gateway::PlaceError;
use crate::limits::Refusal;

/// An error answer of the gateway.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: &'static str,
    /// Seconds before a retry may succeed (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with no `param` and no `Retry-After`.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            retry_after: None,
        }
    }

    /// 400 about one parameter.
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                message,
            )
        }
    }

    /// 404 for a route the API does not have.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// 503 while no node can take the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_node_available",
                message,
            )
        }
    }

    /// The error event that ends a stream that broke after its first byte.
    pub fn sse_event(&self) -> String {
        format!("data: {}\n\n", self.body())
    }

    fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<PlaceError> for ApiError {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::UnknownModel { model, served } => ApiError {
                param: Some("model"),
                ..Self::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!(
                        "The model '{model}' does not exist here (served: {}).",
                        served.join(", ")
                    ),
                )
            },
            PlaceError::Incompatible {
                model,
                preference,
                compatible,
            } => ApiError {
                code: "incompatible_device",
                ..Self::bad_param(
                    "gpu_preference",
                    format!(
                        "'{preference}' cannot run '{model}'; its compatible devices are: {} \
                         (or 'auto').",
                        compatible.join(", ")
                    ),
                )
            },
            PlaceError::Unavailable { model, devices } => ApiError {
                retry_after: Some(5),
                ..Self::unavailable(format!(
                    "No healthy node with {} serves '{model}' right now; retry later.",
                    devices.join(" or ")
                ))
            },
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthorized => Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "Missing or invalid API key. Send it as 'Authorization: Bearer KEY'.",
            ),
            Refusal::NotAdmin(why) => Self::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "admin_key_required",
                format!("{why}; send the admin key."),
            ),
            Refusal::Limited { what, retry_after } => ApiError {
                retry_after: Some(retry_after),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    format!("Rate limit reached for this key ({what}); retry in {retry_after} s."),
                )
            },
        }
    }
}
