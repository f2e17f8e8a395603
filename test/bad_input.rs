//! Bad input gets a clear error and the server keeps serving: malformed gRPC payloads, empty
//! domains, huge requests, extreme hits_addend, bad JSON on the admin endpoint.

mod inproc;

use bytes::{Buf, BufMut};
use hivemind::proto::{Code, RateLimitRequest};
use inproc::{ask, descriptor, request, InProc};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code as GrpcCode;

const RULES: &str = r#"
domain: test
descriptors:
  - key: k
    rate_limit: { unit: hour, requests_per_unit: 5 }
"#;

/// A codec that sends raw bytes as the request message, to put garbage on the wire.
#[derive(Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

async fn raw_call(server: &InProc, payload: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    grpc.unary(tonic::Request::new(payload), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

async fn still_serving(server: &InProc) {
    let r = server
        .client()
        .await
        .should_rate_limit(request("test", &[&[("k", "alive")]]))
        .await
        .expect("server stopped answering");
    assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn malformed_protobuf_payloads_are_rejected_cleanly() {
    let server = InProc::start(RULES, |_| {}).await;
    for garbage in [
        vec![0xff; 16],               // invalid wire types
        vec![0x0a, 0xff, 0xff, 0xff], // length prefix past the end
        vec![0x12, 0x02, 0x0a],       // truncated nested message
        b"definitely not protobuf".to_vec(),
    ] {
        let err = raw_call(&server, garbage)
            .await
            .expect_err("garbage accepted");
        assert_eq!(err.code(), GrpcCode::Internal, "{err:?}");
        assert!(err.message().contains("decode"), "{err:?}");
    }
    // An empty message decodes as an empty request: a clear argument error.
    let err = raw_call(&server, Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    still_serving(&server).await;
}

#[tokio::test]
async fn empty_domain_and_empty_descriptors_are_invalid_arguments() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let err = client
        .should_rate_limit(request("", &[&[("k", "v")]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    assert_eq!(err.message(), "rate limit domain must not be empty");
    let err = client
        .should_rate_limit(request("test", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    assert_eq!(
        err.message(),
        "rate limit descriptor list must not be empty"
    );
    let err = client
        .should_rate_limit(request("test", &[&[]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    still_serving(&server).await;
}

#[tokio::test]
async fn a_thousand_descriptors_get_a_thousand_statuses() {
    let server = InProc::start(RULES, |_| {}).await;
    let values: Vec<String> = (0..1_000).map(|i| format!("v{i}")).collect();
    let req = RateLimitRequest {
        domain: "test".into(),
        descriptors: values.iter().map(|v| descriptor(&[("k", v)])).collect(),
        hits_addend: 1,
    };
    let r = server
        .client()
        .await
        .should_rate_limit(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses.len(), 1_000);
    assert!(r.statuses.iter().all(|s| s.limit_remaining == 4));
    still_serving(&server).await;
}

#[tokio::test]
async fn sixty_four_kib_values_are_limited_like_any_other() {
    let server = InProc::start(RULES, |_| {}).await;
    let big = "x".repeat(64 * 1024);
    let req = request("test", &[&[("k", &big)]]);
    let mut client = server.client().await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(ask(&mut client, req.clone()).await.overall_code);
    }
    let ok = Code::Ok as i32;
    let over = Code::OverLimit as i32;
    assert_eq!(codes, [ok, ok, ok, ok, ok, over]);
    // Beyond grpc.max_message_bytes: refused with a clear status, nothing else breaks.
    let huge = "y".repeat(5 * 1024 * 1024);
    let err = client
        .should_rate_limit(request("test", &[&[("k", &huge)]]))
        .await
        .unwrap_err();
    // tonic reports an oversized message as OUT_OF_RANGE, naming the limit.
    assert_eq!(err.code(), GrpcCode::OutOfRange, "{err:?}");
    assert!(err.message().contains("4194304"), "{err:?}");
    still_serving(&server).await;
}

#[tokio::test]
async fn hits_addend_of_u32_max_is_over_and_consumes_nothing() {
    let server = InProc::start(RULES, |_| {}).await;
    let mut client = server.client().await;
    let mut req = request("test", &[&[("k", "max")]]);
    req.hits_addend = u32::MAX;
    let r = ask(&mut client, req.clone()).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    // A 64-bit per-descriptor addend is clamped, not wrapped.
    req.descriptors[0].hits_addend = Some(u64::MAX);
    let r = ask(&mut client, req).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = ask(&mut client, request("test", &[&[("k", "max")]])).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 4,
        "the rejected addends were counted"
    );
}

#[tokio::test]
async fn admin_json_answers_200_429_and_400() {
    let server = InProc::start(RULES, |_| {}).await;
    let http = reqwest::Client::new();
    let url = server.admin_url("/json");
    let body = r#"{"domain":"test","descriptors":[{"entries":[{"key":"k","value":"json"}]}],"hitsAddend":5}"#;
    let ok = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let json: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(json["overallCode"], "OK");
    assert_eq!(json["statuses"][0]["code"], "OK");
    assert_eq!(json["statuses"][0]["currentLimit"]["requestsPerUnit"], 5);
    assert_eq!(json["statuses"][0]["currentLimit"]["unit"], "HOUR");
    assert_eq!(json["statuses"][0]["limitRemaining"], 0);
    assert!(json["statuses"][0]["durationUntilReset"]
        .as_str()
        .unwrap()
        .ends_with('s'));

    let over = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(over.status(), 429);
    let json: serde_json::Value = over.json().await.unwrap();
    assert_eq!(json["overallCode"], "OVER_LIMIT");

    for bad in [
        "{",
        "[]",
        r#"{"domain":"test","descriptors":"nope"}"#,
        r#"{"domain":""}"#,
    ] {
        let r = http.post(&url).body(bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let json: serde_json::Value = r.json().await.unwrap();
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}"
        );
    }
    still_serving(&server).await;
}

#[tokio::test]
async fn admin_healthcheck_rlconfig_and_stats() {
    let server = InProc::start(RULES, |_| {}).await;
    let health = reqwest::get(server.admin_url("/healthcheck"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap().trim(), "OK");

    let rlconfig: serde_json::Value = server.admin_json("/rlconfig").await;
    assert_eq!(rlconfig["hash"].as_str().map(str::len), Some(64));
    assert_eq!(rlconfig["domains"][0]["domain"], "test");

    let stats: serde_json::Value = server.admin_json("/stats").await;
    assert_eq!(stats["strategy"], "standalone");
    assert_eq!(stats["counters"]["max_keys"], 1_000_000);
    assert_eq!(stats["rules"]["hash"], rlconfig["hash"]);
}

#[tokio::test]
async fn a_flood_of_distinct_keys_is_capped_and_still_enforced() {
    let server = InProc::start(RULES, |s| s.counters.max_keys = 200).await;
    let mut client = server.client().await;
    for i in 0..1_000 {
        let r = client
            .should_rate_limit(request("test", &[&[("k", &format!("flood-{i}"))]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let stats: serde_json::Value = server.admin_json("/stats").await;
    let live = stats["counters"]["live_keys"].as_u64().unwrap();
    assert!(live <= 200, "{stats}");
    assert!(
        stats["counters"]["evicted_keys"].as_u64().unwrap() >= 800,
        "{stats}"
    );
    // Enforcement did not stop: a key still hits its limit.
    let hot = request("test", &[&[("k", "hot")]]);
    let mut over = false;
    for _ in 0..6 {
        over = ask(&mut client, hot.clone()).await.overall_code == Code::OverLimit as i32;
    }
    assert!(over);
}
