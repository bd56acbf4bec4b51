//! The API error: one enum, one stable numeric code per variant (DESIGN §3.1), turned
//! into `{"error":{"code":N,"message":"..."}}` over HTTP and into an error reply or a
//! close code over WebSocket. Internal details never reach the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use weft_proto::{ErrorBody, ErrorDetail};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No credentials where they are needed, or bad ones. The message never repeats
    /// the credential.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{message}")]
    Gone { message: String, cursor: String },
    #[error("{0}")]
    TooLarge(String),
    /// The request target is longer than `limits.max_uri_bytes`.
    #[error("{0}")]
    UriTooLong(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A well-formed request the server will not carry out as asked (an
    /// `Idempotency-Key` reused with another body).
    #[error("{0}")]
    Unprocessable(String),
    /// The header fields exceed `limits.max_header_bytes` (or hyper's own bounds).
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{message}")]
    Unavailable { message: String, retry_after_s: u64 },
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound => 404,
            ApiError::MethodNotAllowed => 405,
            ApiError::Gone { .. } => 410,
            ApiError::TooLarge(_) => 413,
            ApiError::UriTooLong(_) => 414,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Unprocessable(_) => 422,
            ApiError::HeadersTooLarge(_) => 431,
            ApiError::RateLimited { .. } => 429,
            ApiError::Unavailable { .. } => 503,
        }
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code(),
            message: self.to_string(),
            cursor: match self {
                ApiError::Gone { cursor, .. } => Some(cursor.clone()),
                _ => None,
            },
        }
    }

    /// The JSON body, for HTTP responses and WebSocket error replies alike.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: self.detail(),
        })
        .expect("error body serialises")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let ApiError::Unauthorized(_) = &self {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"weft\""),
            );
        }
        if let ApiError::RateLimited { retry_after_s, .. }
        | ApiError::Unavailable { retry_after_s, .. } = &self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        resp
    }
}
