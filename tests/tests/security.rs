//! The agent's gRPC port under hostile callers (scenario X3), against real agents of a cluster
//! launched with TLS (as every harness cluster is): no client certificate, a plaintext client,
//! a certificate of another CA, an expired certificate, and a valid certificate whose identity
//! is not on the allow-list calling a mutating RPC. Each is refused with a clear error, and the
//! legitimate caller keeps working.

use std::time::Duration;

use harness::{Cluster, ClusterOptions};
use myha_proto::agent::{self as pb, agent_client::AgentClient};
use pki::issue::{Authority, Leaf};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;

/// Connects to `addr` over TLS trusting the cluster CA, presenting `identity` (or nothing)
/// and makes one `FullStatus` call: the error text, or `None` when it was answered.
async fn full_status_with(addr: &str, tls: ClientTlsConfig) -> Result<pb::Health, String> {
    let ep = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let ch = ep.connect().await.map_err(|e| chain(&e))?;
    AgentClient::new(ch)
        .full_status(pb::FullStatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{:?}: {} ({})", s.code(), s.message(), source_chain(&s)))
}

/// What the agent at `addr` answers a TLS client trusting `ca_pem` that presents
/// `identity` (PEM certificate and key) or nothing: the TLS alert's text when it refuses it,
/// `Ok` when it accepts it. Reads before writing: with TLS 1.3 the client's handshake is over
/// before the server has checked the client's certificate, and a client that writes first
/// (as gRPC does) usually sees only the connection close, not the alert. The agent's HTTP/2
/// server speaks first when it accepted the client.
async fn tls_verdict(
    addr: &str,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert PEM"),
                PrivateKeyDer::from_pem_slice(key).expect("key PEM"),
            )
            .expect("client auth"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let host = addr.rsplit_once(':').expect("host:port").0.to_string();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from(host).expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut first = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("closed without an alert".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn source_chain(s: &tonic::Status) -> String {
    use std::error::Error;
    s.source().map(chain).unwrap_or_default()
}

/// The agent's Prometheus metrics text.
async fn agent_metrics(agent: &harness::AgentProc) -> String {
    pki::install_crypto_provider();
    reqwest::get(format!("http://{}/metrics", agent.http_addr()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// `SetReadOnly` at `term` by the holder of the shard lock of `epoch`.
fn read_only_request(term: u64, epoch: u64) -> pb::SetReadOnlyRequest {
    pb::SetReadOnlyRequest {
        ctx: Some(pb::ActionContext {
            term,
            timeout_ms: 5_000,
            requester: "security test".into(),
            lock_epoch: epoch,
        }),
        read_only: true,
        super_read_only: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_grpc_refuses_callers_without_a_valid_allowed_certificate() {
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let agent = c.tablet(1).agent_proc().expect("agent");
    let addr = agent.grpc_addr().to_string();
    let ca_pem = std::fs::read(c.certs().ca_file()).expect("ca.pem");
    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
    let current_term = || async {
        let h = agent.full_status().await.expect("legitimate FullStatus");
        h.term
    };

    // The legitimate caller (the orchestrators' identity, holding the shard lock) reads and acts.
    let lock = c.lock_shard("security test").await.expect("shard lock");
    let epoch = lock.epoch();
    let term = current_term().await;
    let mut legit = agent.client().await.expect("orchestrator client");
    legit
        .set_read_only(read_only_request(term, epoch))
        .await
        .expect("the orchestrator's SetReadOnly is accepted");

    // 1. Plaintext: the port speaks TLS only.
    let e = agent
        .client_as(None)
        .await
        .map(|_| ())
        .err()
        .map(|e| e.to_string());
    let plain = match e {
        Some(e) => e,
        None => {
            let mut cl = agent.client_as(None).await.expect("connected");
            let r = cl.full_status(pb::FullStatusRequest {}).await;
            assert!(r.is_err(), "a plaintext FullStatus was answered: {r:?}");
            format!("{:?}", r.err())
        }
    };
    println!("plaintext: {plain}");
    // The server reads the HTTP/2 preface as a TLS record and closes: the client sees a
    // protocol error, a refused connection, or a write on the closed socket, depending on
    // timing. Never an answer, never a status from the service.
    assert!(
        ["h2 protocol error", "connect", "transport error"]
            .iter()
            .any(|m| plain.contains(m)),
        "{plain}"
    );

    // 2. TLS without a client certificate: the handshake is refused.
    let e = full_status_with(&addr, trust())
        .await
        .expect_err("FullStatus without a client certificate was answered");
    println!("no client certificate: {e}");
    let verdict = tls_verdict(&addr, &ca_pem, None).await;
    assert!(
        verdict
            .as_ref()
            .is_err_and(|v| v.contains("CertificateRequired")),
        "{verdict:?}"
    );
    // The call's own error may only say the connection closed (see `tls_verdict`).
    assert!(
        e.contains("CertificateRequired") || e.contains("connection closed"),
        "{e}"
    );

    // 3. A certificate of another CA, and 4. an expired one of the cluster CA, both with the
    // orchestrators' name: the handshake fails, and the probe reads the exact alert.
    let other = Authority::new("someone else's CA").expect("other CA");
    let forged = other
        .issue(&Leaf::client(harness::certs::ORCHESTRATOR_IDENTITY))
        .expect("forged");
    let expired = c
        .certs()
        .authority()
        .issue(&Leaf::client(harness::certs::ORCHESTRATOR_IDENTITY).expired())
        .expect("expired");
    for (case, cert, alert) in [
        ("other CA", &forged, "UnknownCA"),
        ("expired", &expired, "CertificateExpired"),
    ] {
        let e = full_status_with(
            &addr,
            trust().identity(tonic::transport::Identity::from_pem(
                &cert.cert_pem,
                &cert.key_pem,
            )),
        )
        .await
        .expect_err(case);
        println!("{case}: {e}");
        let verdict = tls_verdict(
            &addr,
            &ca_pem,
            Some((cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())),
        )
        .await;
        assert!(
            verdict.as_ref().is_err_and(|v| v.contains(alert)),
            "{case}: {verdict:?}"
        );
    }

    // The probe accepts a good certificate (so its refusals above mean something).
    let operator_files = c.certs().operator().expect("operator certificate");
    let verdict = tls_verdict(
        &addr,
        &ca_pem,
        Some((&operator_files.cert_pem, operator_files.key_pem())),
    )
    .await;
    assert_eq!(verdict, Ok(()));

    // The agent, which knows why, logs each refused handshake with its reason and the
    // caller's address, and counts it (the refused clients above mostly saw "closed").
    let log = std::fs::read_to_string(agent.log_path()).expect("agent log");
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gRPC TLS handshake refused"))
        .collect();
    println!("the agent's log:\n{}", refused.join("\n"));
    for (case, words) in [
        ("no client certificate", &["no certificates"][..]),
        ("another CA", &["UnknownIssuer", "unknown issuer"][..]),
        ("expired", &["xpired"][..]),
    ] {
        assert!(
            refused
                .iter()
                .any(|l| l.contains("127.0.0.1:") && words.iter().any(|w| l.contains(w))),
            "no refusal logged for {case}:\n{}",
            refused.join("\n")
        );
    }
    let metrics = agent_metrics(agent).await;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("myha_agent_rpcs_refused_total{kind=\"tls_handshake\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        counted >= 6.0,
        "refused handshakes counted: {counted}\n{metrics}"
    );

    // 5. A valid certificate (the operator's) not on the allow-list: reads are served,
    // mutating RPCs refused with the reason.
    let operator = c.certs().operator().expect("operator certificate");
    let mut op = agent
        .client_as(Some(&operator))
        .await
        .expect("operator client");
    op.full_status(pb::FullStatusRequest {})
        .await
        .expect("any certificate of the cluster CA may read");
    let mut stream = op
        .stream_health(pb::StreamHealthRequest {})
        .await
        .expect("StreamHealth for a reader")
        .into_inner();
    assert!(stream.message().await.expect("a health message").is_some());
    let term = current_term().await;
    let s = op
        .set_read_only(read_only_request(term, epoch))
        .await
        .expect_err("SetReadOnly from an identity not on the allow-list");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("\"myhactl\"") && s.message().contains("grpc_allowed_clients"),
        "{}",
        s.message()
    );
    let s = op
        .promote(pb::PromoteRequest {
            ctx: Some(pb::ActionContext {
                term: term + 1,
                timeout_ms: 5_000,
                requester: "orchestrator (claimed)".into(),
                lock_epoch: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("Promote from an identity not on the allow-list");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // The refused Promote did not raise the agent's term (nothing was admitted).
    assert_eq!(current_term().await, term, "a refused call moved the term");

    // The legitimate caller is unaffected by all of the above.
    let term = current_term().await;
    legit
        .set_read_only(read_only_request(term, epoch))
        .await
        .expect("the orchestrator still acts");
    let metrics = agent_metrics(agent).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("myha_agent_rpcs_refused_total{kind=\"not_allowed\"} ")),
        "refusals not counted:\n{metrics}"
    );
    c.shutdown().await.expect("shutdown");
}

/// Only the shard lock's holder named in etcd acts, and an allowed identity pushing a term far
/// ahead (which, persisted, would make every later recovery's term stale) is refused unless
/// etcd shows the term reserved by the caller as the holder, as a real recovery does first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_jump_is_admitted_only_when_etcd_shows_it_reserved_by_the_lock_holder() {
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let agent = c.tablet(1).agent_proc().expect("agent");
    let mut client = agent.client().await.expect("orchestrator client");
    let known = agent.full_status().await.expect("FullStatus").term;
    let request = |term: u64, epoch: u64| pb::SetReadOnlyRequest {
        ctx: Some(pb::ActionContext {
            term,
            timeout_ms: 5_000,
            requester: "security test".into(),
            lock_epoch: epoch,
        }),
        read_only: true,
        super_read_only: true,
    };

    // The test acts as the shard lock's holder, as a recovery does.
    let lock = c
        .topo()
        .lock_shard(
            c.keyspace(),
            c.shard(),
            topo::LockRequest::new("security test", "reserve a term"),
        )
        .await
        .expect("shard lock");
    let epoch = lock.epoch();

    // The maximum term, and a smaller jump: nobody reserved them.
    for term in [u64::MAX, known + 5] {
        let s = client
            .set_read_only(request(term, epoch))
            .await
            .expect_err("an unreserved term jump was admitted");
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains("no recovery reserved it"),
            "{}",
            s.message()
        );
    }
    assert_eq!(
        agent.full_status().await.expect("FullStatus").term,
        known,
        "a refused jump moved the known term"
    );

    // The holder reserves known + 5 under the shard lock, as a recovery does.
    let (mut record, _) = c
        .topo()
        .get_shard(c.keyspace(), c.shard())
        .await
        .expect("read shard")
        .expect("shard record");
    record.reserved_term = topo::Term::new(known + 5);
    lock.update_shard(&record).await.expect("reserve the term");
    // Another epoch than the holder's, for the reserved jump or for the known term itself:
    // refused, naming the holder; nothing admitted.
    for term in [known + 5, known] {
        let s = client
            .set_read_only(request(term, epoch + 1))
            .await
            .expect_err("a non-holder's action was admitted");
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains(&format!(
                "lock epoch {} is not the shard lock's holder in etcd (epoch {epoch}, security test)",
                epoch + 1
            )),
            "{}",
            s.message()
        );
    }
    assert_eq!(
        agent.full_status().await.expect("FullStatus").term,
        known,
        "a non-holder moved the known term"
    );
    client
        .set_read_only(request(known + 5, epoch))
        .await
        .expect("the holder's reserved jump is admitted");
    assert_eq!(
        agent.full_status().await.expect("FullStatus").term,
        known + 5
    );
    // Released: nobody holds the lock, so even the last holder's epoch is refused.
    lock.release().await.expect("release");
    let s = client
        .set_read_only(request(known + 5, epoch))
        .await
        .expect_err("an action while nobody holds the lock");
    assert!(
        s.message().contains("nobody holds the shard lock"),
        "{}",
        s.message()
    );
    c.shutdown().await.expect("shutdown");
}

/// The orchestrator's API as every launched cluster runs it: HTTPS with a certificate of the
/// cluster CA, and tokens with roles (scenario X4). A plaintext client and a client that does
/// not trust the cluster CA get nothing; a `read` token reads but cannot change; the `operate`
/// token changes, and the record names the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_https_with_tokens_and_roles() {
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        start_orchestrator: true,
        orchestrator_config: Some(std::sync::Arc::new(
            |cfg: &mut harness::OrchestratorConfig| {
                cfg.orchestrator.api_tokens.push(harness::ApiTokenConfig {
                    name: "viewer".into(),
                    role: harness::ApiRole::Read,
                    token: Some("viewer-secret-token".into()),
                    token_file: None,
                });
            },
        )),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let o = c.orchestrator().expect("orchestrator");
    let base = o.url("");
    assert!(base.starts_with("https://"), "{base}");
    pki::install_crypto_provider();

    // Plaintext HTTP to the HTTPS port: no answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let e = plain
        .get(format!("http://{}/health", o.http_addr()))
        .send()
        .await
        .expect_err("plaintext HTTP was answered by the HTTPS API");
    println!("plaintext to the API: {e:?}");

    // A client that trusts another CA refuses the API's certificate.
    let other = Authority::new("someone else's CA").expect("other CA");
    let stranger = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(other.cert_pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let e = stranger
        .get(format!("{base}/health"))
        .send()
        .await
        .expect_err("a client of another CA accepted the API's certificate");
    let e = format!("{e:?}");
    println!("client of another CA: {e}");
    assert!(e.contains("UnknownIssuer"), "{e}");

    // Tokens and roles, over HTTPS.
    let (code, _) = o.get_text_with_token("/api/v1/shards", None).await.unwrap();
    assert_eq!(code, 401);
    let (code, _) = o
        .get_text_with_token("/api/v1/shards", Some("wrong"))
        .await
        .unwrap();
    assert_eq!(code, 401);
    let (code, body) = o
        .get_text_with_token("/api/v1/shards", Some("viewer-secret-token"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let disable = serde_json::json!({"reason": "security test"});
    let (code, body) = o
        .post_json_with_token(
            "/api/v1/recoveries/disable",
            &disable,
            Some("viewer-secret-token"),
        )
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, body) = o
        .post_json("/api/v1/recoveries/disable", &disable)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let status = o.get_json("/api/v1/shards").await.unwrap();
    let reason = status["recoveries_disabled_reason"].to_string();
    assert!(reason.contains("token:harness"), "{status:#}");
    assert!(!reason.contains("viewer"), "{status:#}");
    c.shutdown().await.expect("shutdown");
}
