//! Pulling from an OCI distribution registry.

use std::sync::Arc;

use vmlet_protocol::api::Response;
use vmlet_protocol::{ApiError, ErrorCode};

use crate::agent::Agent;

/// Pulls `reference` into the store.
pub async fn pull(_agent: &Arc<Agent>, reference: &str) -> Result<Response, ApiError> {
    crate::ids::validate_image(reference)?;
    Err(ApiError::new(
        ErrorCode::Unavailable,
        "pulling from a registry is not implemented yet: use vmlet image import",
    ))
}
