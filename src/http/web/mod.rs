//! The chat page: one HTML page with its scripts and style, built into the binary and served at
//! `/` and at `/c/<id>` (the open conversation is in the address, so reloads, links and
//! back/forward work). The page is a client like any other: it uses only the public REST routes
//! and the plain WebSocket at `/ws`. Scripts and styles are files of their own, so the page runs
//! under the server's Content-Security-Policy (`script-src 'self'`).

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// Every answer is revalidated: the files change with the binary, and a revalidation whose
/// `ETag` still matches costs a 304 without a body.
const CACHE_CONTROL: &str = "no-cache";

/// One file of the page, with the strong `ETag` of its content.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    hash: u64,
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static str) -> Asset {
        Asset {
            name,
            content_type,
            body,
            hash: fnv1a(body.as_bytes()),
        }
    }

    fn etag(&self) -> String {
        format!("\"{:016x}\"", self.hash)
    }

    /// The file, or 304 when the client's `If-None-Match` names its current version.
    fn answer(&self, if_none_match: Option<&str>) -> Response {
        let etag = self.etag();
        let mut response = if if_none_match.is_some_and(|tags| matches_etag(tags, &etag)) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut response = Response::new(self.body.into());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
            response
        };
        let headers = response.headers_mut();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        );
        if let Ok(etag) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, etag);
        }
        response
    }
}

/// The page itself, for `/` and `/c/<id>`.
const PAGE: Asset = Asset::new(
    "index.html",
    "text/html; charset=utf-8",
    include_str!("assets/index.html"),
);

/// The files the page loads, each at `/<name>`.
const FILES: [Asset; 4] = [
    Asset::new(
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    Asset::new(
        "markdown.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/markdown.js"),
    ),
    Asset::new(
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    Asset::new("icon.svg", "image/svg+xml", include_str!("assets/icon.svg")),
];

/// FNV-1a, 64 bits: a stable fingerprint of a file for its `ETag`, computed at compile time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Whether an `If-None-Match` list names `etag` (weak or strong) or is `*`.
fn matches_etag(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// `GET /`, `GET /c/<id>` and the page's files; when `enabled` is false, none of them exists.
pub fn routes(enabled: bool) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let enabled = warp::any()
        .and_then(move || async move {
            if enabled {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    let conversation = warp::path!("c" / String).map(drop).untuple_one();
    let page = warp::path::end().or(conversation).unify().map(|| &PAGE);
    let file = warp::path::param::<String>()
        .and(warp::path::end())
        .and_then(|name: String| async move {
            FILES
                .iter()
                .find(|asset| asset.name == name)
                .ok_or_else(warp::reject::not_found)
        });
    enabled
        .and(warp::get())
        .and(page.or(file).unify())
        .and(warp::header::optional::<String>("if-none-match"))
        .map(|asset: &'static Asset, if_none_match: Option<String>| {
            asset.answer(if_none_match.as_deref())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_match_in_lists_weak_or_strong() {
        let etag = PAGE.etag();
        assert!(matches_etag(&etag, &etag));
        assert!(matches_etag(&format!("\"other\", W/{etag}"), &etag));
        assert!(matches_etag("*", &etag));
        assert!(!matches_etag("\"other\"", &etag));
    }

    #[test]
    fn each_file_has_its_own_etag() {
        let mut etags: Vec<String> = FILES.iter().chain([&PAGE]).map(Asset::etag).collect();
        etags.sort();
        etags.dedup();
        assert_eq!(etags.len(), FILES.len() + 1);
    }
}
