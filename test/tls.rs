//! TLS on the gRPC listener, with certificates made here (rcgen): a client that trusts the CA is
//! served; a plaintext client is not; with `grpc.tls_client_ca` a client without a certificate
//! from that CA is refused, one with it served; through a real Envoy whose rate limit cluster
//! speaks TLS (and presents a client certificate), the limit is enforced.

mod inproc;
mod support;

use std::path::PathBuf;

use hivemind::proto::{Code, RateLimitServiceClient};
use inproc::{request, InProc};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const RULES: &str = r#"
domain: test
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 2 }
"#;

/// A CA, a server certificate for `localhost`/127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        // Distinct subject names: BoringSSL (Envoy) refuses a leaf whose subject equals its
        // issuer's, which rcgen's default name would make it.
        let named = |names: Vec<String>, common_name: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params
        };
        let mut ca_params = named(Vec::new(), "hivemind test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>, common_name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = named(names, common_name).signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
        let (client_cert_pem, client_key_pem) = leaf(vec!["envoy.client".into()], "envoy client");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem,
            client_key_pem,
        };
        for (name, text) in [
            ("ca.pem", pki.ca_pem.as_str()),
            ("server.pem", &server_cert),
            ("server.key", &server_key),
            ("client.pem", &pki.client_cert_pem),
            ("client.key", &pki.client_key_pem),
        ] {
            std::fs::write(pki.dir.path().join(name), text).unwrap();
        }
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn tls_client(
    server: &InProc,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<RateLimitServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(
            &pki.client_cert_pem,
            &pki.client_key_pem,
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", server.grpc_addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RateLimitServiceClient::new(channel))
}

async fn call(client: &mut RateLimitServiceClient<Channel>) -> Result<i32, tonic::Status> {
    client
        .should_rate_limit(request("test", &[&[("user", "alice")]]))
        .await
        .map(|r| r.into_inner().overall_code)
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_plaintext() {
    let pki = Pki::new();
    let server = InProc::start(RULES, |s| {
        s.grpc.tls_cert = Some(pki.path("server.pem"));
        s.grpc.tls_key = Some(pki.path("server.key"));
    })
    .await;
    let mut client = tls_client(&server, &pki, false).await.expect("TLS connect");
    assert_eq!(call(&mut client).await.unwrap(), Code::Ok as i32);
    // A plaintext HTTP/2 client gets no answer from a TLS listener.
    let plain = RateLimitServiceClient::connect(format!("http://{}", server.grpc_addr)).await;
    if let Ok(mut plain) = plain {
        assert!(call(&mut plain).await.is_err(), "plaintext served over TLS");
    }
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = InProc::start(RULES, |s| {
        s.grpc.tls_cert = Some(pki.path("server.pem"));
        s.grpc.tls_key = Some(pki.path("server.key"));
        s.grpc.tls_client_ca = Some(pki.path("ca.pem"));
    })
    .await;
    let anonymous = tls_client(&server, &pki, false).await;
    if let Ok(mut anonymous) = anonymous {
        assert!(
            call(&mut anonymous).await.is_err(),
            "a client without a certificate was served"
        );
    }
    let mut client = tls_client(&server, &pki, true)
        .await
        .expect("mutual TLS connect");
    assert_eq!(call(&mut client).await.unwrap(), Code::Ok as i32);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn unusable_tls_files_stop_the_server_with_the_setting_and_path() {
    let pki = Pki::new();
    let missing = pki.path("nope.key");
    let server = InProc::start(RULES, |s| {
        s.grpc.tls_cert = Some(pki.path("server.pem"));
        s.grpc.tls_key = Some(missing.clone());
    })
    .await;
    let err = server.stop().await.expect_err("started without its key");
    let text = err.to_string();
    assert!(text.contains("grpc.tls_key"), "{text}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
}

/// The repository's Envoy example pointed at `rls`, with its rate limit cluster over TLS:
/// presenting the client certificate, trusting the CA, checking the server's name.
fn envoy_config_over_tls(pki: &Pki, rls: std::net::SocketAddr) -> String {
    let config = support::example_envoy_config(rls, support::free_port());
    let marker = "    - name: rls\n";
    assert_eq!(config.matches(marker).count(), 1, "one rls cluster");
    let tls = format!(
        r#"    - name: rls
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: "{}" }}
                private_key: {{ filename: "{}" }}
            validation_context:
              trusted_ca: {{ filename: "{}" }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}
"#,
        pki.path("client.pem").display(),
        pki.path("client.key").display(),
        pki.path("ca.pem").display(),
    );
    config.replacen(marker, &tls, 1)
}

/// The rules `config/envoy.yaml`'s `/generic` route needs, per hour so no window ends mid-test.
const ENVOY_RULES: &str = r#"
domain: hivemind
descriptors:
  - key: generic_key
    value: default
    rate_limit: { unit: hour, requests_per_unit: 5 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_enforces_limits_through_a_mutual_tls_rate_limit_cluster() {
    let pki = Pki::new();
    let server = InProc::start(ENVOY_RULES, |s| {
        s.grpc.tls_cert = Some(pki.path("server.pem"));
        s.grpc.tls_key = Some(pki.path("server.key"));
        s.grpc.tls_client_ca = Some(pki.path("ca.pem"));
    })
    .await;
    let config = envoy_config_over_tls(&pki, server.grpc_addr);
    let statuses = tokio::task::spawn_blocking(move || {
        let envoy = support::Envoy::start(&config);
        let ingress = envoy.listener_addr("ingress");
        let statuses: Vec<u16> = (0..7)
            .map(|_| {
                support::http_request(ingress, "GET", "/generic", &[], b"")
                    .unwrap_or_else(|e| panic!("GET /generic via envoy: {e}\n{}", envoy.log()))
                    .status
            })
            .collect();
        let limited = envoy.stat("cluster.upstream.ratelimit.over_limit");
        let rls_stats = support::http_get(
            envoy.admin_addr,
            "/stats?filter=cluster.rls.(ssl|upstream_cx)",
        )
        .map(|r| r.body)
        .unwrap_or_default();
        (statuses, limited, format!("{rls_stats}\n{}", envoy.log()))
    })
    .await
    .unwrap();
    let (statuses, limited, log) = statuses;
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429],
        "over_limit stat {limited:?}\n{log}"
    );
    server.stop().await.expect("clean shutdown");
}
