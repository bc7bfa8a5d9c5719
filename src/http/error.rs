//! The API's error type: every failure leaves as `{"error": {"code", "message"}}` with the matching
//! status code, whatever the route. On the guest listener the message of a server error is replaced
//! (the host's side of a failure, its paths, git's or SQLite's words, stays in the daemon's log).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::jobfiles::JobFilesError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    UnknownProfile(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    ShuttingDown(String),
    /// A well-formed request for something that cannot be done with what it sent (an image that
    /// lacks what a template needs).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::UnknownProfile(_) => "unknown_profile",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::ShuttingDown(_) => "shutting_down",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "internal error serving a request");
        ApiError::Internal(err.to_string())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) | ApiError::UnknownProfile(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull(_) | ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::QueueFull(n) => ApiError::QueueFull(format!(
                "the queue is full: {n} job{} waiting, as many as admission.queue_max allows; \
                 submit again once some have started",
                if n == 1 { "" } else { "s" }
            )),
            other => ApiError::internal(other),
        }
    }
}

impl From<JobFilesError> for ApiError {
    fn from(err: JobFilesError) -> Self {
        match err {
            JobFilesError::PathNotConfined(_) | JobFilesError::Incomplete(_) => {
                ApiError::BadRequest(err.to_string())
            }
            JobFilesError::PathConflict(_) => ApiError::Conflict(err.to_string()),
            JobFilesError::OverQuota { .. } => ApiError::PayloadTooLarge(err.to_string()),
            // Already logged where the bundle was made; these messages name no host path.
            JobFilesError::BundleRefused(message) => ApiError::Conflict(message),
            JobFilesError::BundleUnavailable(message) => ApiError::Internal(message),
            JobFilesError::ResultRefused(_) => ApiError::Conflict(err.to_string()),
            JobFilesError::BundleTimeout { .. }
            | JobFilesError::BundleFailed { .. }
            | JobFilesError::Repo(_)
            | JobFilesError::ResultFailed { .. }
            | JobFilesError::Io { .. }
            | JobFilesError::TaskFailed(_) => ApiError::internal(err),
        }
    }
}

/// What a guest reads for any internal error (see `hide_internal_errors` in `super`).
pub const GUEST_INTERNAL_MESSAGE: &str = "internal error; the daemon's log has the details";

/// Turns actix's body and JSON errors into API errors with a clear message.
pub fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::OverflowKnownLength { length, limit } => ApiError::PayloadTooLarge(format!(
            "request body of {length} bytes is over the {limit}-byte limit"
        )),
        E::Overflow { limit } => {
            ApiError::PayloadTooLarge(format!("request body is over the {limit}-byte limit"))
        }
        E::ContentType => ApiError::BadRequest("send the body as application/json".into()),
        E::Deserialize(e) => ApiError::InvalidJson(format!("invalid JSON body: {e}")),
        other => ApiError::BadRequest(other.to_string()),
    }
}

pub fn query_error(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::BadRequest(format!("invalid query: {err}"))
}

pub fn path_error(err: actix_web::error::PathError) -> ApiError {
    ApiError::BadRequest(format!("invalid path: {err}"))
}
