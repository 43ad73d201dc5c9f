//! End-to-end: webhooks. A receiver in the test (an axum server on loopback) records every
//! request; tenants register endpoints with the official SDK's own webhook API and plain HTTP;
//! batches end completed, failed, cancelled and expired; every delivery is verified with the
//! official SDK's `client.webhooks.unwrap` (`tests/python/webhooks_verify.py`). Also: a 500
//! is retried with the same `webhook-id`, a redirect is not followed, private addresses are
//! refused unless allowed, another tenant's endpoints are invisible, and a delivery pending
//! while the scheduler is `kill -9`ed is made after its restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use nightshift_core::BatchId;
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually, run_python};
use nightshift_metadata::{MetadataStore, WebhookDeliveryState};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
    status: u16,
}

/// A webhook receiver. Paths: `/ok` answers 200; `/flaky` answers 500 to the first delivery
/// of each `webhook-id`, then 200; `/redirect` answers 307 to `/redirected` (which must never
/// be reached); `/down` answers 503 while `down` is set, then 200.
struct Receiver {
    origin: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    down: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start() -> Self {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let down = Arc::new(AtomicBool::new(true));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let (h, d) = (hits.clone(), down.clone());
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let (hits, down) = (h.clone(), d.clone());
            async move {
                let headers: BTreeMap<String, String> = headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            v.to_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                let id = headers.get("webhook-id").cloned().unwrap_or_default();
                let mut hits = hits.lock().expect("hits");
                let status = match uri.path() {
                    "/flaky"
                        if !hits.iter().any(|x| {
                            x.path == "/flaky" && x.headers.get("webhook-id") == Some(&id)
                        }) =>
                    {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                    "/redirect" => StatusCode::TEMPORARY_REDIRECT,
                    "/down" if down.load(Ordering::SeqCst) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::OK,
                };
                hits.push(Hit {
                    path: uri.path().to_owned(),
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    status: status.as_u16(),
                });
                let mut resp = status.into_response();
                if status == StatusCode::TEMPORARY_REDIRECT {
                    resp.headers_mut()
                        .insert("location", "/redirected".parse().expect("header"));
                }
                resp
            }
        });
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
                .expect("receiver");
        });
        Self {
            origin,
            hits,
            down,
            stop,
        }
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .expect("hits")
            .iter()
            .filter(|h| h.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The batch id an event body names.
fn batch_of(hit: &Hit) -> String {
    let v: Value = serde_json::from_str(&hit.body).expect("json body");
    v["data"]["id"].as_str().unwrap_or_default().to_owned()
}

fn last_json(out: &str) -> Value {
    serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line")
}

/// Plain HTTP against the gateway with `key`.
async fn call(
    stack: &Stack,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}/v1{path}", stack.origin))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn deliveries(store: &dyn MetadataStore, batch: &str) -> Vec<WebhookDeliveryState> {
    store
        .webhook_deliveries_of(&BatchId::parse(batch).expect("batch id"))
        .await
        .expect("deliveries")
}

/// Runs `webhooks_verify.py` over `hits`: every one verifies with `secret` and names the
/// expected event type of its batch.
async fn verify(stack: &Stack, key: &str, secret: &str, hits: &[Hit], expect: &Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deliveries.json");
    let records: Vec<Value> = hits
        .iter()
        .map(|h| json!({"headers": h.headers, "body": h.body}))
        .collect();
    std::fs::write(&path, serde_json::to_vec(&records).expect("json")).expect("write");
    let out = stack
        .python(
            "webhooks_verify.py",
            &[
                ("NS_API_KEY", key.to_owned()),
                ("NS_SECRET", secret.to_owned()),
                ("NS_EXPECT", expect.to_string()),
                ("NS_DELIVERIES", path.display().to_string()),
            ],
        )
        .await
        .expect("every delivery verifies with the SDK");
    assert_eq!(last_json(&out)["verified"], hits.len());
}

async fn every_terminal_event_is_delivered_signed(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let receiver = Receiver::start().await;
    let (_, key) = stack.tenant("webhooks").await.expect("tenant");
    let out = stack
        .python(
            "webhooks_batches.py",
            &[
                ("NS_API_KEY", key.clone()),
                ("NS_RECEIVER", format!("{}/ok", receiver.origin)),
            ],
        )
        .await
        .expect("script");
    let r = last_json(&out);
    let secret = r["secret"].as_str().expect("secret").to_owned();
    let batches = r["batches"].as_object().expect("batches").clone();
    let expect: Value = batches
        .iter()
        .map(|(kind, id)| {
            (
                id.as_str().expect("id").to_owned(),
                json!(format!("batch.{kind}")),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    // every batch's event arrives (at least once)
    let hits = eventually("an event per batch", Duration::from_secs(60), || async {
        let hits = receiver.hits("/ok");
        let missing: Vec<&String> = expect
            .as_object()
            .expect("map")
            .keys()
            .filter(|b| !hits.iter().any(|h| &&batch_of(h) == b))
            .collect();
        if missing.is_empty() {
            Ok(hits)
        } else {
            Err(format!("no event yet for {missing:?}"))
        }
    })
    .await
    .expect("deliveries");
    for h in &hits {
        assert_eq!(h.headers["content-type"], "application/json");
        assert!(h.headers.contains_key("webhook-timestamp"));
    }
    verify(&stack, &key, &secret, &hits, &expect).await;
    // the outbox says so too: one event per batch, delivered at the first attempt
    for id in expect.as_object().expect("map").keys() {
        let states = eventually("delivered", Duration::from_secs(30), || async {
            let d = deliveries(stack.metadata.as_ref(), id).await;
            if d.len() == 1 && d[0].state == "delivered" {
                Ok(d)
            } else {
                Err(format!("{d:?}"))
            }
        })
        .await
        .expect("outbox");
        assert_eq!(states[0].attempts, 1, "{states:?}");
        assert_eq!(json!(states[0].event_type), expect[id]);
    }

    // another tenant sees none of it
    let endpoint = r["endpoint"].as_str().expect("endpoint").to_owned();
    let (_, other) = stack.tenant("webhooks-other").await.expect("tenant");
    let path = format!("/webhook_endpoints/{endpoint}");
    for (method, p) in [
        (reqwest::Method::GET, path.clone()),
        (reqwest::Method::DELETE, path.clone()),
        (reqwest::Method::POST, format!("{path}/rotate_secret")),
    ] {
        let (status, body) = call(&stack, &other, method.clone(), &p, None).await;
        assert_eq!(status, 404, "{method} {p}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    let (status, list) = call(
        &stack,
        &other,
        reqwest::Method::GET,
        "/webhook_endpoints",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["data"], json!([]), "{list}");
    // the owner still has it; deleting it answers OpenAI's deleted object, then 404
    let (status, _) = call(&stack, &key, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200);
    let (status, gone) = call(&stack, &key, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(
        (status, &gone["object"], &gone["deleted"]),
        (200, &json!("webhook_endpoint.deleted"), &json!(true))
    );
    let (status, _) = call(&stack, &key, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 404);
    // client mistakes are 400s in the envelope
    for (body, param) in [
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"event_types": ["batch.completed"]}), "url"),
        (
            json!({"url": "https://example.com/x", "event_types": ["batch.done"]}),
            "event_types",
        ),
        (json!({"url": "https://example.com/x", "nope": 1}), "nope"),
    ] {
        let (status, err) = call(
            &stack,
            &key,
            reqwest::Method::POST,
            "/webhook_endpoints",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
    }
    stack.stop().await.expect("stop");
}

async fn failures_are_retried_and_redirects_not_followed(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let receiver = Receiver::start().await;
    let (_, key) = stack.tenant("webhooks-retry").await.expect("tenant");
    for path in ["/flaky", "/redirect"] {
        let (status, body) = call(
            &stack,
            &key,
            reqwest::Method::POST,
            "/webhook_endpoints",
            Some(json!({"url": format!("{}{path}", receiver.origin), "event_types": ["batch.completed"]})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let out = stack
        .python(
            "webhooks_batches.py",
            &[
                ("NS_API_KEY", key.clone()),
                ("NS_KINDS", "completed".into()),
            ],
        )
        .await
        .expect("script");
    let batch = last_json(&out)["batches"]["completed"]
        .as_str()
        .expect("id")
        .to_owned();
    // the 500 is retried, with the same webhook-id and body
    let flaky = eventually("a retried delivery", Duration::from_secs(60), || async {
        let hits = receiver.hits("/flaky");
        if hits.iter().any(|h| h.status == 200) {
            Ok(hits)
        } else {
            Err(format!("{} attempts", hits.len()))
        }
    })
    .await
    .expect("retry");
    assert!(flaky.len() >= 2, "{flaky:?}");
    assert_eq!(flaky[0].status, 500);
    assert!(
        flaky
            .iter()
            .all(|h| h.headers["webhook-id"] == flaky[0].headers["webhook-id"])
    );
    assert!(flaky.iter().all(|h| h.body == flaky[0].body));
    assert_eq!(batch_of(&flaky[0]), batch);
    // the redirect was answered, not followed: the delivery stays pending with the reason
    let states = eventually("a refused redirect", Duration::from_secs(60), || async {
        let d = deliveries(stack.metadata.as_ref(), &batch).await;
        let redirect = d.iter().find(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("redirect"))
        });
        match redirect {
            Some(_) if d.iter().any(|s| s.state == "delivered") => Ok(d),
            _ => Err(format!("{d:?}")),
        }
    })
    .await
    .expect("outbox");
    let redirect = states
        .iter()
        .find(|s| s.state == "pending")
        .expect("the redirected delivery is still pending");
    assert!(redirect.attempts >= 1, "{states:?}");
    assert!(!receiver.hits("/redirect").is_empty());
    assert!(
        receiver.hits("/redirected").is_empty(),
        "a redirect was followed"
    );
    stack.stop().await.expect("stop");
}

async fn private_addresses_are_refused_unless_allowed(deployment: Deployment) {
    let mut opts = StackOptions::on(deployment);
    opts.webhooks.allow_private_addresses = false;
    let stack = Stack::start(opts).await.expect("stack");
    let receiver = Receiver::start().await;
    let (tenant, key) = stack.tenant("webhooks-ssrf").await.expect("tenant");
    for url in [
        format!("{}/ok", receiver.origin),
        "http://localhost:9/x".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[::1]:9/x".to_owned(),
        "http://10.0.0.1/x".to_owned(),
    ] {
        let (status, err) = call(
            &stack,
            &key,
            reqwest::Method::POST,
            "/webhook_endpoints",
            Some(json!({"url": url})),
        )
        .await;
        assert_eq!(status, 400, "{url}: {err}");
        assert_eq!(err["error"]["param"], "url", "{err}");
    }
    // an endpoint that got in anyway (written straight into the store) is refused at delivery
    let now = nightshift_core::time::now_unix();
    stack
        .metadata
        .create_webhook_endpoint(&nightshift_core::webhook::WebhookEndpointRecord {
            id: nightshift_core::WebhookEndpointId::generate(),
            tenant_id: nightshift_core::TenantId::parse(&tenant).expect("tenant id"),
            url: format!("{}/ok", receiver.origin),
            events: nightshift_core::webhook::EventType::ALL.to_vec(),
            name: String::new(),
            secret: nightshift_core::webhook::generate_secret(),
            previous_secret: None,
            previous_secret_until: None,
            created_at_us: now * 1_000_000,
            updated_at: now,
        })
        .await
        .expect("insert");
    let out = stack
        .python(
            "webhooks_batches.py",
            &[
                ("NS_API_KEY", key.clone()),
                ("NS_KINDS", "completed".into()),
            ],
        )
        .await
        .expect("script");
    let batch = last_json(&out)["batches"]["completed"]
        .as_str()
        .expect("id")
        .to_owned();
    eventually("a refused delivery", Duration::from_secs(60), || async {
        let d = deliveries(stack.metadata.as_ref(), &batch).await;
        match d.first() {
            Some(s)
                if s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("not a public address")) =>
            {
                Ok(())
            }
            _ => Err(format!("{d:?}")),
        }
    })
    .await
    .expect("refused");
    assert!(
        receiver.hits("/ok").is_empty(),
        "a private address was reached"
    );
    stack.stop().await.expect("stop");
}

nightshift_e2e::for_both_deployments!(
    every_terminal_event_is_delivered_signed,
    failures_are_retried_and_redirects_not_followed,
    private_addresses_are_refused_unless_allowed,
);

/// A delivery pending (its receiver down) while the scheduler is `kill -9`ed is made by the
/// next scheduler: the outbox is in Postgres, and its lease or its retry time brings it back.
#[tokio::test]
async fn a_pending_delivery_survives_kill_9_of_the_scheduler() {
    use nightshift_e2e::cluster::{Cluster, ClusterOptions};
    let receiver = Receiver::start().await;
    let options = ClusterOptions::new(nightshift_inference_sim::SimConfig::default())
        .set(
            "NIGHTSHIFT_SCHEDULER__WEBHOOKS__ALLOW_PRIVATE_ADDRESSES",
            "true",
        )
        .set("NIGHTSHIFT_SCHEDULER__WEBHOOKS__BACKOFF_BASE", "1s")
        .set("NIGHTSHIFT_SCHEDULER__WEBHOOKS__BACKOFF_MAX", "2s")
        .set("NIGHTSHIFT_SCHEDULER__WEBHOOKS__POLL_INTERVAL", "100ms")
        .set("NIGHTSHIFT_SCHEDULER__WEBHOOKS__TIMEOUT", "2s");
    let mut cluster = Cluster::start_with(options).await.expect("cluster");
    let key = cluster.tenant("webhooks-crash").await.expect("tenant");
    let register = reqwest::Client::new()
        .post(format!("{}/v1/webhook_endpoints", cluster.origin))
        .bearer_auth(&key)
        .json(&json!({"url": format!("{}/down", receiver.origin)}))
        .send()
        .await
        .expect("register");
    assert_eq!(register.status().as_u16(), 200);
    let out = run_python(
        &cluster.origin,
        None,
        "webhooks_batches.py",
        &[
            ("NS_API_KEY", key.clone()),
            ("NS_KINDS", "completed".into()),
        ],
    )
    .await
    .expect("script");
    let batch = last_json(&out)["batches"]["completed"]
        .as_str()
        .expect("id")
        .to_owned();
    // the receiver refuses it at least once: the delivery is pending in the outbox
    eventually("a failed attempt", Duration::from_secs(60), || async {
        match receiver.hits("/down").len() {
            0 => Err("no attempt yet"),
            _ => Ok(()),
        }
    })
    .await
    .expect("attempt");
    cluster.kill9("scheduler").await.expect("kill");
    receiver.down.store(false, Ordering::SeqCst);
    let before = receiver.hits("/down").len();
    cluster.spawn("scheduler").await.expect("fresh scheduler");
    let hits = eventually(
        "the delivery after the restart",
        Duration::from_secs(90),
        || async {
            let hits = receiver.hits("/down");
            if hits.iter().any(|h| h.status == 200) {
                Ok(hits)
            } else {
                Err(format!("{} attempts", hits.len()))
            }
        },
    )
    .await
    .expect("delivered");
    assert!(hits.len() > before);
    assert!(
        hits.iter()
            .all(|h| h.headers["webhook-id"] == hits[0].headers["webhook-id"])
    );
    assert_eq!(batch_of(&hits[0]), batch);
    let states = eventually("recorded", Duration::from_secs(30), || async {
        let d = deliveries(cluster.metadata.as_ref(), &batch).await;
        if d.len() == 1 && d[0].state == "delivered" {
            Ok(d)
        } else {
            Err(format!("{d:?}"))
        }
    })
    .await
    .expect("outbox");
    assert!(states[0].attempts >= 2, "{states:?}");
    cluster.stop().await.expect("stop");
}
