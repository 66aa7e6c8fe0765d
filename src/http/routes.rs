//! The route table: the template of every path the server answers and the methods it takes
//! there, for the request metrics (one series per route) and the `Allow` header of a 405.

/// A route the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The path's template, e.g. `/api/conversations/:id`.
    pub template: &'static str,
    /// The methods it answers, as an `Allow` header lists them.
    pub methods: &'static str,
}

const fn route(template: &'static str, methods: &'static str) -> Option<Route> {
    Some(Route { template, methods })
}

/// The route serving `path`, if any; a trailing `/` names the same route, as the routes take it.
pub fn route_of(path: &str) -> Option<Route> {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "health"] => route("/api/health", "GET"),
        ["api", "chat"] => route("/api/chat", "POST"),
        ["api", "auth", "register"] => route("/api/auth/register", "POST"),
        ["api", "auth", "login"] => route("/api/auth/login", "POST"),
        ["api", "me"] => route("/api/me", "GET"),
        ["api", "conversations"] => route("/api/conversations", "GET"),
        ["api", "conversations", _] => route("/api/conversations/:id", "GET, PATCH, DELETE"),
        ["api", "conversations", _, "stop"] => route("/api/conversations/:id/stop", "POST"),
        ["api", "conversations", _, "regenerate"] => {
            route("/api/conversations/:id/regenerate", "POST")
        }
        ["api", "openapi.json"] => route("/api/openapi.json", "GET"),
        ["api", "docs"] => route("/api/docs", "GET"),
        ["api", "docs", "docs.js"] => route("/api/docs/docs.js", "GET"),
        ["ws"] => route("/ws", "GET"),
        ["metrics"] => route("/metrics", "GET"),
        ["socket.io", ..] => route("/socket.io/", "GET, POST"),
        [""] => route("/", "GET"),
        ["c", _] => route("/c/:id", "GET"),
        [file @ ("app.js" | "markdown.js" | "app.css" | "icon.svg")] => match *file {
            "app.js" => route("/app.js", "GET"),
            "markdown.js" => route("/markdown.js", "GET"),
            "app.css" => route("/app.css", "GET"),
            _ => route("/icon.svg", "GET"),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(path: &str) -> Option<&'static str> {
        route_of(path).map(|r| r.template)
    }

    #[test]
    fn paths_become_templates() {
        assert_eq!(
            template("/api/conversations/abc"),
            Some("/api/conversations/:id")
        );
        assert_eq!(
            template("/api/conversations/abc/stop"),
            Some("/api/conversations/:id/stop")
        );
        assert_eq!(template("/api/health"), Some("/api/health"));
        assert_eq!(template("/api/docs/docs.js"), Some("/api/docs/docs.js"));
        assert_eq!(template("/socket.io/"), Some("/socket.io/"));
        assert_eq!(template("/"), Some("/"));
        assert_eq!(template("/c/abc"), Some("/c/:id"));
        assert_eq!(template("/app.js"), Some("/app.js"));
        assert_eq!(template("/api/conversations/"), Some("/api/conversations"));
        assert_eq!(template("/api/health/"), Some("/api/health"));
        assert_eq!(template("/api/conversations/a/b"), None);
        assert_eq!(template("/other.js"), None);
    }

    #[test]
    fn a_conversation_takes_three_methods() {
        assert_eq!(
            route_of("/api/conversations/x").map(|r| r.methods),
            Some("GET, PATCH, DELETE")
        );
    }
}
