//! The machine-readable contract: an OpenAPI 3.1 document of every route [`crate::api_routes`]
//! serves, at `/v1/openapi.json` (and `/openapi.json`, `/v1/openai/openapi.json`: each copy's
//! `servers` names the prefix it was read under). No key is needed to read it.
//!
//! The document is generated from the handlers' `#[utoipa::path]` annotations and the
//! `ToSchema` derives of the core types the handlers serialise, so a changed field changes it.
//! What derives cannot say is written here by hand: OpenAI's error envelope (built by
//! [`crate::error::HttpError`]), the two request bodies (read field by field, not by a serde
//! derive), the security schemes, and the errors every operation may answer. The
//! `tests/openapi.rs` e2e test runs schemathesis against a live stack to keep it true.

use std::sync::LazyLock;

use axum::Json;
use axum::extract::{OriginalUri, State};
use nightshift_core::batch::SUPPORTED_ENDPOINTS;
use nightshift_core::file::{MAX_EXPIRES_AFTER_SECS, MIN_EXPIRES_AFTER_SECS, Purpose};
use nightshift_core::page::Order;
use serde_json::{Value, json};
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::server::Server;
use utoipa::openapi::{Content, OpenApi as Document, Ref, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::{AppState, batches, files, webhooks};

/// Where the document is served, under each prefix the API answers on.
pub const PATH: &str = "/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nightshift",
        description = "A self-hostable, OpenAI-compatible Batch API: OpenAI's Files and Batches \
                       routes, kept drop-in for the official `openai` SDKs. The same API answers \
                       under `/v1`, at the root and under `/v1/openai`. The prose contract is \
                       docs/openai-compat.md.",
    ),
    paths(
        files::upload::create,
        files::read::list,
        files::read::retrieve,
        files::read::delete,
        files::read::content,
        batches::create,
        batches::list,
        batches::retrieve,
        batches::cancel,
        webhooks::create,
        webhooks::list,
        webhooks::retrieve,
        webhooks::delete,
        webhooks::rotate_secret,
        batches::retry,
        crate::results::results,
        document,
    ),
    // Query parameters' schemas are not collected on their own.
    components(schemas(ErrorResponse, Order, Purpose)),
    modifiers(&Security, &EveryError),
    security(("bearer" = []), ("api_key" = [])),
    tags(
        (name = "Files", description = "Upload, list, read, download and delete files."),
        (name = "Batches", description = "Create, list, read and cancel batches."),
        (name = "Webhooks", description = "nightshift's extension: endpoints that receive the caller's batch events, signed as Standard Webhooks says."),
        (name = "Meta", description = "This document."),
    ),
)]
struct ApiDoc;

/// The document as generated, before the per-request touches of [`document`].
static BASE: LazyLock<Document> = LazyLock::new(ApiDoc::openapi);

/// The document (as JSON) for a gateway with `completion_windows`, served under `prefix`
/// (`""`, `/v1` or `/v1/openai`).
pub fn build(prefix: &str, completion_windows: &[String]) -> Value {
    let mut doc = BASE.clone();
    let url = if prefix.is_empty() { "/" } else { prefix };
    doc.servers = Some(vec![Server::new(url)]);
    // The windows are the operator's: say exactly which this gateway takes.
    if let Some(components) = doc.components.as_mut() {
        components.schemas.insert(
            CreateBatchRequest::name().into_owned(),
            create_batch_request(completion_windows).into(),
        );
    }
    // Plain data with string keys: serialising it cannot fail.
    let mut doc = serde_json::to_value(doc).expect("the OpenAPI document serialises");
    Links::add(&mut doc);
    doc
}

/// `GET /v1/openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "Meta",
    operation_id = "getOpenApiDocument",
    summary = "This OpenAPI document",
    description = "No key is needed. `servers` names the prefix the document was read under.",
    security(),
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object)),
)]
pub async fn document(State(state): State<AppState>, OriginalUri(uri): OriginalUri) -> Json<Value> {
    let prefix = uri.path().strip_suffix(PATH).unwrap_or("/v1");
    Json(build(prefix, &state.config.completion_windows))
}

/// The `Idempotency-Key` request header of the creating routes (docs/api.md).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// Extension: up to 255 printable ASCII characters. The same key from the same tenant
    /// within 24 hours returns the first request's object without creating anything; with a
    /// different request it is a 409 `idempotency_key_reused`.
    #[param(
        rename = "Idempotency-Key",
        max_length = 255,
        min_length = 1,
        pattern = "^[ -~]+$"
    )]
    pub idempotency_key: Option<String>,
}

/// OpenAI's error envelope: the body of every 4xx and 5xx the gateway answers, axum's own
/// rejections included.
#[derive(ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// The `error` of an [`ErrorResponse`].
#[derive(ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error class.
    #[schema(schema_with = error_type)]
    pub r#type: String,
    /// The request field at fault (`purpose`, `limit`, `metadata.team`), if any.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A machine-readable code (`missing_required_parameter`, `invalid_value`, ...), if any.
    #[schema(required = true)]
    pub code: Option<String>,
}

fn error_type() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([
            "invalid_request_error",
            "authentication_error",
            "permission_error",
            "rate_limit_error",
            "server_error",
        ]))
}

/// The JSON body of `POST /v1/batches`. Read into `CreateBatchBody` (every field a raw JSON
/// value, checked by `CreateBatch::check`), so its schema is written here.
pub struct CreateBatchRequest;

impl PartialSchema for CreateBatchRequest {
    fn schema() -> RefOr<Schema> {
        create_batch_request(&crate::GatewayConfig::default().completion_windows).into()
    }
}

impl ToSchema for CreateBatchRequest {}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn nullable(kind: Type) -> SchemaType {
    SchemaType::from_iter([kind, Type::Null])
}

fn create_batch_request(completion_windows: &[String]) -> Schema {
    let metadata = ObjectBuilder::new()
        .schema_type(nullable(Type::Object))
        .description(Some(
            "Up to 16 string values, keys of at most 64 characters, values of at most 512.",
        ))
        .max_properties(Some(nightshift_core::batch::METADATA_MAX_KEYS))
        .property_names(Some(
            string().max_length(Some(nightshift_core::batch::METADATA_MAX_KEY_CHARS)),
        ))
        .additional_properties(Some(
            string().max_length(Some(nightshift_core::batch::METADATA_MAX_VALUE_CHARS)),
        ));
    let output_expires_after = ObjectBuilder::new()
        .schema_type(nullable(Type::Object))
        .description(Some(
            "Lifetime of the output and error files; 30 days after their creation by default.",
        ))
        .property(
            "anchor",
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .enum_values(Some([Some("created_at"), None])),
        )
        .property(
            "seconds",
            expiry_seconds().schema_type(nullable(Type::Integer)),
        )
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "input_file_id",
                string()
                    .min_length(Some(1))
                    .description(Some("The id of a file uploaded with purpose `batch`.")),
            )
            .required("input_file_id")
            .property(
                "endpoint",
                string()
                    .enum_values(Some(SUPPORTED_ENDPOINTS))
                    .description(Some(
                        "The endpoint every input line calls: one of OpenAI's batch endpoints, \
                         listed here. An operator may declare more per upstream \
                         (`[[routing.upstreams]] endpoints`, e.g. vLLM's `/v1/rerank`); this \
                         deployment then accepts those too (docs/api.md, \"Operator-declared \
                         endpoints\").",
                    )),
            )
            .required("endpoint")
            .property(
                "completion_window",
                string()
                    .enum_values(Some(completion_windows.iter().map(String::as_str)))
                    .description(Some(
                        "A window the operator allows (`gateway.completion_windows`).",
                    )),
            )
            .required("completion_window")
            .property("metadata", metadata)
            .property("output_expires_after", output_expires_after)
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build(),
    )
}

/// `expires_after[seconds]` of an upload, `output_expires_after.seconds` of a batch.
fn expiry_seconds() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(MIN_EXPIRES_AFTER_SECS))
        .maximum(Some(MAX_EXPIRES_AFTER_SECS))
}

/// The `multipart/form-data` body of `POST /v1/files`, read field by field by the upload
/// handler (the file part streams to storage as it arrives).
pub struct FileUpload;

impl PartialSchema for FileUpload {
    fn schema() -> RefOr<Schema> {
        let purposes = Purpose::UPLOADABLE.map(Purpose::as_str);
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "file",
                string()
                    .format(Some(SchemaFormat::Custom("binary".into())))
                    .content_media_type("application/octet-stream")
                    .description(Some(
                        "The bytes; for `batch`, JSONL (one JSON object per line).",
                    )),
            )
            .required("file")
            .property(
                "purpose",
                string()
                    .enum_values(Some(purposes))
                    .description(Some("`batch_output` is produced by batches only.")),
            )
            .required("purpose")
            .property(
                "expires_after[anchor]",
                string().enum_values(Some(["created_at"])),
            )
            .property(
                "expires_after[seconds]",
                expiry_seconds().description(Some(
                    "With `expires_after[anchor]`. Without them a `batch` file expires after 30 \
                     days and any other never.",
                )),
            )
            .into()
    }
}

impl ToSchema for FileUpload {}

/// The two ways to present a key: `Authorization: Bearer` (the SDKs) or `x-api-key`.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <API key>`, as the SDKs send it.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// Errors any authenticated operation may answer, in the envelope: 400 (a malformed request:
/// axum's rejections), 401 (no or an unknown key), 500 and 503 (a bug; a dependency down).
struct EveryError;

impl EveryError {
    const STATUSES: [(&str, &str); 4] = [
        (
            "400",
            "A malformed request (the message says what is wrong).",
        ),
        ("401", "No API key, or an unknown one."),
        ("500", "A bug."),
        (
            "503",
            "A dependency (the scheduler, object storage) does not answer.",
        ),
    ];

    fn add(op: &mut Operation) {
        let public = op
            .security
            .as_ref()
            .is_some_and(|s| s.is_empty() || s.iter().any(|r| r == &Default::default()));
        for (status, description) in Self::STATUSES {
            if public && status == "401" {
                continue;
            }
            op.responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| error_response(description));
        }
    }
}

impl Modify for EveryError {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                Self::add(op);
            }
        }
    }
}

/// OpenAPI links: which operation reads the object another returned (a client, or
/// schemathesis's stateful phase, follows them to real files and batches). Added to the JSON:
/// utoipa 5 writes a Link's keys in snake case (`operation_id`), which no reader understands.
struct Links;

impl Links {
    /// `(from operation, link name, to operation, the id it takes)`.
    const LINKS: [(&str, &str, &str, &str); 7] = [
        (
            "createFile",
            "RetrieveFile",
            "retrieveFile",
            "$response.body#/id",
        ),
        (
            "createFile",
            "DownloadFile",
            "downloadFile",
            "$response.body#/id",
        ),
        (
            "createFile",
            "DeleteFile",
            "deleteFile",
            "$response.body#/id",
        ),
        (
            "createBatch",
            "RetrieveBatch",
            "retrieveBatch",
            "$response.body#/id",
        ),
        (
            "createBatch",
            "CancelBatch",
            "cancelBatch",
            "$response.body#/id",
        ),
        (
            "createBatch",
            "RetrieveInputFile",
            "retrieveFile",
            "$response.body#/input_file_id",
        ),
        (
            "retrieveBatch",
            "CancelBatch",
            "cancelBatch",
            "$response.body#/id",
        ),
    ];

    /// Adds the links to the `200` responses of `doc` (the document as JSON).
    fn add(doc: &mut Value) {
        let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
            return;
        };
        for op in paths
            .values_mut()
            .filter_map(Value::as_object_mut)
            .flat_map(|item| item.values_mut())
        {
            let id = op
                .get("operationId")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let Some(ok) = op
                .pointer_mut("/responses/200")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            for (from, name, to, param) in Self::LINKS {
                if id.as_deref() == Some(from) {
                    let links = ok.entry("links").or_insert_with(|| json!({}));
                    links[name] = json!({"operationId": to, "parameters": {"id": param}});
                }
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(ErrorResponse::name()))),
        )
        .into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::response::IntoResponse;
    use http::{Method, Request, StatusCode};
    use nightshift_core::{ApiError, ErrorKind};
    use nightshift_proto::client::SchedulerClient;
    use nightshift_state::MemoryState;
    use nightshift_storage::LocalStore;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::GatewayConfig;
    use crate::error::HttpError;

    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    /// The prefixes `app()` nests `api_routes()` under.
    const PREFIXES: [&str; 3] = ["", "/v1", "/v1/openai"];

    fn json() -> Value {
        build("/v1", &["24h".into(), "7d".into()])
    }

    /// `(METHOD, path)` of every operation the document lists.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = json();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method.to_lowercase()).is_some() {
                    out.insert((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    /// `(METHOD, path)` of every route `api_routes()` declares, read from its source: an axum
    /// router cannot list its routes. The probes of `the_router_serves_exactly_what_is_read`
    /// check this reading against the router itself.
    fn declared() -> BTreeSet<(String, String)> {
        let src = include_str!("lib.rs");
        let start = src.find("fn api_routes()").expect("api_routes() in lib.rs");
        let body = &src[start..];
        let body = &body[..body.find("\n}\n").expect("the end of api_routes()")];
        for opaque in [".merge(", ".nest(", ".nest_service(", ".route_service("] {
            assert!(
                !body.contains(opaque),
                "api_routes() mounts routes with `{opaque}`: teach this test to read them"
            );
        }
        let mut out = BTreeSet::new();
        for route in body.split(".route(").skip(1) {
            let (path, handlers) = route.split_once(',').expect("route(path, handlers)");
            let path = match path.trim() {
                "openapi::PATH" => PATH.to_owned(),
                lit => lit
                    .strip_prefix('"')
                    .and_then(|l| l.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("a route path this test cannot read: {lit}"))
                    .to_owned(),
            };
            let bytes = handlers.as_bytes();
            for method in METHODS {
                let call = format!("{}(", method.to_lowercase());
                // `get(`, `.post(`, `routing::post(`, but not `files::delete)` or `forget(`.
                let routed = handlers.match_indices(&call).any(|(i, _)| {
                    i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')
                });
                if routed {
                    out.insert((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    async fn app() -> (axum::Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = AppState {
            config: Arc::new(GatewayConfig {
                completion_windows: vec!["24h".into(), "1h".into()],
                ..GatewayConfig::default()
            }),
            // Never called: every probe is refused (no key) or public.
            control: SchedulerClient::connect_lazy("http://127.0.0.1:9", Duration::from_secs(1))
                .unwrap(),
            storage: Arc::new(LocalStore::open(dir.path()).await.unwrap()),
            live: Arc::new(MemoryState::new()),
        };
        (crate::app(state), dir)
    }

    async fn call(app: &axum::Router, method: &str, path: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_reference_resolves() {
        let text = build("/v1", &["24h".into()]).to_string();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        serde_json::from_str::<Document>(&text).expect("utoipa reads its own document back");
        fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "{r}");
        }
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["api_key"]["name"], "x-api-key");
    }

    #[test]
    fn every_link_leads_to_an_operation() {
        let doc = json();
        let mut ids = BTreeSet::new();
        let mut targets = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                ids.extend(op["operationId"].as_str());
                for resp in op["responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|r| r.values())
                {
                    for link in resp["links"]
                        .as_object()
                        .into_iter()
                        .flat_map(|l| l.values())
                    {
                        targets.push(link["operationId"].as_str().unwrap().to_owned());
                    }
                }
            }
        }
        assert_eq!(targets.len(), Links::LINKS.len());
        for target in targets {
            assert!(ids.contains(target.as_str()), "{target}");
        }
    }

    #[test]
    fn every_route_api_routes_serves_is_documented() {
        let declared = declared();
        assert!(declared.len() >= 10, "{declared:?}");
        assert_eq!(
            declared,
            documented(),
            "api_routes() and the OpenAPI document disagree: annotate the handler with \
             #[utoipa::path] and list it in ApiDoc's paths(...)"
        );
    }

    #[tokio::test]
    async fn the_router_serves_exactly_what_is_read() {
        let (app, _dir) = app().await;
        let declared = declared();
        let paths: BTreeSet<&String> = declared.iter().map(|(_, p)| p).collect();
        for prefix in PREFIXES {
            for path in &paths {
                let uri = format!("{prefix}{}", path.replace("{id}", "x-1"));
                for method in METHODS {
                    let (status, body) = call(&app, method, &uri).await;
                    let expected = if !declared.contains(&(method.to_owned(), path.to_string())) {
                        StatusCode::METHOD_NOT_ALLOWED
                    } else if path.as_str() == PATH {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    assert_eq!(status, expected, "{method} {uri}: {body}");
                }
            }
        }
    }

    #[tokio::test]
    async fn it_is_served_without_a_key_under_every_prefix() {
        let (app, _dir) = app().await;
        for prefix in PREFIXES {
            let (status, doc) = call(&app, "GET", &format!("{prefix}{PATH}")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(doc["openapi"], "3.1.0");
            let server = if prefix.is_empty() { "/" } else { prefix };
            assert_eq!(doc["servers"][0]["url"], server);
            // The gateway's own windows, not the defaults.
            assert_eq!(
                doc["components"]["schemas"]["CreateBatchRequest"]["properties"]["completion_window"]
                    ["enum"],
                serde_json::json!(["24h", "1h"])
            );
        }
    }

    #[test]
    fn every_error_response_is_the_envelope() {
        let doc = json();
        let envelope = serde_json::json!({"$ref": "#/components/schemas/ErrorResponse"});
        let mut errors = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(responses) = op.get("responses").and_then(Value::as_object) else {
                    continue;
                };
                for status in ["400", "500", "503"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
                let public = op.get("security") == Some(&serde_json::json!([]));
                assert_eq!(responses.contains_key("401"), !public, "{method} {path}");
                for (status, resp) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        errors += 1;
                        assert_eq!(
                            resp["content"]["application/json"]["schema"], envelope,
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        assert!(errors > 30);
    }

    /// The envelope's schema is written by hand: it must say what `HttpError` sends.
    #[tokio::test]
    async fn the_envelope_schema_is_what_http_error_sends() {
        let doc = json();
        let schema = &doc["components"]["schemas"]["ErrorBody"];
        let properties: BTreeSet<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let types = schema["properties"]["type"]["enum"].as_array().unwrap();
        for kind in ErrorKind::ALL {
            for err in [
                ApiError::new(kind, "m"),
                ApiError::new(kind, "m").with_param("p").with_code("c"),
            ] {
                let resp = HttpError(err).into_response();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                    .await
                    .unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
                let error = body["error"].as_object().unwrap();
                let keys: BTreeSet<&String> = error.keys().collect();
                assert_eq!(keys, properties);
                assert_eq!(required.len(), keys.len());
                assert!(types.contains(&error["type"]), "{kind:?}");
            }
        }
    }
}
