//! JSON answers, written into a buffer sized for a typical answer rather than grown from empty,
//! or written once beforehand and shared.

use bytes::Bytes;
use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

/// The room a JSON answer starts with: a conversation of a few messages fits.
const JSON_CAPACITY: usize = 1024;

/// `value` as a `200 application/json` answer; a value that cannot be serialized is a 500.
pub fn json<T: Serialize>(value: &T) -> Response {
    let mut body = Vec::with_capacity(JSON_CAPACITY);
    written(serde_json::to_writer(&mut body, value).map(|()| Bytes::from(body)))
}

/// JSON already written (or not: then a 500) as a `200 application/json` answer.
pub fn written(json: Result<Bytes, serde_json::Error>) -> Response {
    match json {
        Ok(body) => {
            let mut response = Response::new(body.into());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "an answer could not be serialized");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
