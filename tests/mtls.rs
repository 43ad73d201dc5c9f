//! End-to-end: mutual TLS on the scheduler's internal gRPC API (`[internal.tls]`, issue 11).
//!
//! A certificate authority, a scheduler certificate and a client certificate are made at test
//! time (plus a second authority and a client certificate of its own). The real-process stack
//! runs with every service configured for mTLS: it comes up ready (the gateway's and the
//! finalizer's readiness call the scheduler) and a small batch completes end to end. Then,
//! each with the right internal token, callers without TLS, with TLS but no certificate, and
//! with a certificate from the other authority are all refused; the right certificate without
//! the token is refused too (both are required); the right certificate and token answer.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use nightshift_e2e::cluster::{Cluster, ClusterOptions};
use nightshift_inference_sim::SimConfig;
use nightshift_proto::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority of the test.
struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("ca certificate").pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and its key, PEM, good for both ends (it names `127.0.0.1` and
    /// `localhost`, and allows server and client authentication): one Secret mounted in every
    /// pod, as the chart does.
    fn issue(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()])
            .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write pem");
    path
}

/// The gRPC health check (an empty request), sending `authorization` if given.
async fn health(endpoint: Endpoint, authorization: Option<&str>) -> tonic::Status {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return tonic::Status::unavailable(format!("connect: {e:?}")),
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(format!("ready: {e:?}"));
    }
    let mut request = tonic::Request::new(());
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii"));
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    match grpc
        .unary(request, path, tonic_prost::ProstCodec::<(), ()>::default())
        .await
    {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

fn endpoint(url: &str, tls: Option<ClientTlsConfig>) -> Endpoint {
    let endpoint = Endpoint::from_str(url)
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    match tls {
        Some(tls) => endpoint.tls_config(tls).expect("tls config"),
        None => endpoint,
    }
}

#[tokio::test]
async fn internal_grpc_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Authority::new("nightshift test ca");
    let (cert, key) = ca.issue("nightshift");
    let other = Authority::new("another ca");
    let (stranger_cert, stranger_key) = other.issue("nightshift");
    let files = TlsFiles {
        ca: write(dir.path(), "ca.crt", &ca.pem),
        cert: write(dir.path(), "tls.crt", &cert),
        key: write(dir.path(), "tls.key", &key),
        server_name: None,
    };

    let options = ClusterOptions {
        internal_tls: Some(files),
        ..ClusterOptions::new(SimConfig {
            base_latency_ms: 5,
            ..SimConfig::default()
        })
    };
    let mut cluster = Cluster::start_with(options)
        .await
        .expect("cluster over mTLS");
    let url = cluster.scheduler_url().to_owned();
    assert!(url.starts_with("https://"), "{url}");

    // End to end: a tenant (the harness's client, over mTLS) and a small batch that the
    // gateway creates and the finalizer commits through the scheduler.
    let api_key = cluster.tenant("mtls").await.expect("tenant over mTLS");
    let batch = cluster
        .create_embeddings_batch(&api_key, 5)
        .await
        .expect("create a batch");
    cluster
        .check_embeddings_batch(&api_key, 5, &batch)
        .await
        .expect("the batch completes");

    let bearer = format!("Bearer {}", cluster.internal_token().expose());
    let trusting = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
    let with_client_cert = || trusting().identity(Identity::from_pem(&cert, &key));

    // The door opens with both the certificate and the token...
    let status = health(endpoint(&url, Some(with_client_cert())), Some(&bearer)).await;
    assert_eq!(
        status.code(),
        tonic::Code::Ok,
        "certificate and token: {status:?}"
    );
    // ...and stays shut with the certificate alone.
    let status = health(endpoint(&url, Some(with_client_cert())), None).await;
    assert_eq!(
        status.code(),
        tonic::Code::Unauthenticated,
        "certificate without the token: {status:?}"
    );

    // Each with the right token: refused before any service sees the call.
    let plain = url.replacen("https://", "http://", 1);
    let refused = [
        ("plain text", endpoint(&plain, None)),
        (
            "TLS without a client certificate",
            endpoint(&url, Some(trusting())),
        ),
        (
            "a client certificate from another CA",
            endpoint(
                &url,
                Some(trusting().identity(Identity::from_pem(&stranger_cert, &stranger_key))),
            ),
        ),
    ];
    for (who, endpoint) in refused {
        let status = health(endpoint, Some(&bearer)).await;
        assert!(
            !matches!(
                status.code(),
                tonic::Code::Ok | tonic::Code::Unauthenticated
            ),
            "{who}: the scheduler answered: {status:?}"
        );
    }

    // The stack is still whole after the refusals.
    assert!(cluster.exited().is_empty(), "a service exited");
    cluster.stop().await.expect("stop");
}
