//! The batch console: a small browser app served at `/console`.
//!
//! It is three static files compiled into the binary ([`ASSETS`]); the page itself needs no
//! key. Everything it shows comes from the public OpenAI API of this same origin, called by
//! the browser with the key the user typed (kept in the tab's `sessionStorage`), so the
//! console adds no state, no session and no route that sees tenant data.
//!
//! Every asset goes out with a strict Content-Security-Policy (scripts and styles from this
//! origin only, no inline code, no framing, API calls to this origin only), `nosniff`, no
//! referrer, and `Cache-Control: no-cache` with an `ETag`: browsers revalidate, and get a
//! bodiless 304 while the binary is the same.

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page's Content-Security-Policy. Downloads are saved from `blob:` object URLs by a
/// navigation, which no directive here governs, so `blob:` is not listed anywhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One compiled-in file.
struct Asset {
    /// Where it is served.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The console's files. `index.html` is also served at `/console/`.
const ASSETS: [Asset; 4] = [
    Asset {
        path: "/console",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        path: "/console/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        path: "/console/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/style.css"),
    },
    Asset {
        path: "/console/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/icon.svg"),
    },
];

/// Each asset's strong `ETag` (a hash of its bytes), in [`ASSETS`] order.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let tag = format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(a.body));
            HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\""))
        })
        .collect()
});

/// The console's routes; they need no state and no key.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for (i, asset) in ASSETS.iter().enumerate() {
        let handler = move |headers: HeaderMap| async move { serve_asset(i, &headers) };
        router = router.route(asset.path, get(handler));
    }
    router.route(
        "/console/",
        get(|h: HeaderMap| async move { serve_asset(0, &h) }),
    )
}

/// The asset at `index`, or 304 when the client already holds these bytes.
fn serve_asset(index: usize, request: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = resp.headers_mut();
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = router::<()>()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .expect("body")
            .to_vec();
        (parts.status, parts.headers, body)
    }

    #[tokio::test]
    async fn serves_every_asset_with_its_type_and_the_security_headers() {
        for (path, ctype) in [
            ("/console", "text/html; charset=utf-8"),
            ("/console/", "text/html; charset=utf-8"),
            ("/console/app.js", "text/javascript; charset=utf-8"),
            ("/console/style.css", "text/css; charset=utf-8"),
            ("/console/icon.svg", "image/svg+xml"),
        ] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], ctype, "{path}");
            assert!(!body.is_empty(), "{path}");
            assert_eq!(
                headers[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY
            );
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
            assert!(headers.contains_key(header::ETAG), "{path}");
        }
    }

    #[test]
    fn the_policy_allows_no_inline_code_and_nothing_from_elsewhere() {
        let directives: Vec<&str> = CONTENT_SECURITY_POLICY.split(';').map(str::trim).collect();
        for must in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(directives.contains(&must), "missing {must}");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(!CONTENT_SECURITY_POLICY.contains("http"));
    }

    #[tokio::test]
    async fn the_page_loads_only_its_own_files_and_no_inline_script() {
        let (_, _, body) = get("/console", &[]).await;
        let html = String::from_utf8(body).expect("utf-8");
        assert!(html.contains(r#"<script type="module" src="/console/app.js"></script>"#));
        assert!(html.contains(r#"href="/console/style.css""#));
        // one script, the module above (an inline one would be blocked by the policy), and
        // no inline style attributes or event handlers either
        assert_eq!(html.matches("<script").count(), 1);
        assert!(!html.contains(" style="));
        assert!(!html.contains(" onclick="));
        assert!(!html.contains("//cdn") && !html.contains("https://"));
    }

    #[tokio::test]
    async fn a_matching_etag_gets_a_bodiless_304() {
        let (_, headers, _) = get("/console/app.js", &[]).await;
        let etag = headers[header::ETAG].to_str().expect("ascii").to_owned();
        let (status, headers, body) = get(
            "/console/app.js",
            &[("if-none-match", &format!("\"x\", {etag}"))],
        )
        .await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(headers[header::ETAG], etag.as_str());
        let (status, _, _) = get("/console/app.js", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn other_paths_are_not_the_consoles() {
        let (status, _, _) = get("/console/nope.js", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
