//! The broker-neutral conformance suite: one set of scenarios, written once
//! against [`BrokerBinding`], run unchanged on every broker.
//!
//! Each scenario gets a fresh endpoint, a fresh [`TestEnv`] (real keys, the
//! example Cedar bundle, a real TTS over HTTP on loopback) and asserts what
//! users rely on: who reaches the handler, what lands in the dead letter and
//! why, that nothing is lost and that no token rides on the wire.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::deadletter::{
    H_DECISION_ID, H_IDEMPOTENCY_KEY, H_PAYLOAD, H_REASON, H_REMOVED, H_SOURCE, H_TRIMMED,
    H_VERDICT, PayloadAt, PayloadRef,
};
use elevate_core::{Headers, OutboundMessage};

use crate::binding::{BrokerBinding, Endpoint, RawMessage};
use crate::env::{Recorder, TestEnv};

/// How long a scenario waits for messages to settle.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

async fn publish_for(
    b: &dyn BrokerBinding,
    env: &TestEnv,
    ep: &Endpoint,
    user: &str,
    body: &str,
    headers: Headers,
) {
    publish_in(b, env, ep, &env.subject(user), body, headers).await;
}

/// Publishes one guarded message in `subject`'s origin transaction.
async fn publish_in(
    b: &dyn BrokerBinding,
    env: &TestEnv,
    ep: &Endpoint,
    subject: &elevate_core::producer::SubjectContext,
    body: &str,
    headers: Headers,
) {
    let subject = subject.clone();
    let audience = env.audience();
    let req = env.publish_request(&subject, &audience, &ep.destination);
    b.publish_guarded(
        ep,
        &env.producer,
        &req,
        OutboundMessage {
            headers,
            payload: body.as_bytes().to_vec(),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("[{}] guarded publish failed: {e}", b.name()));
}

fn reasons(letters: &[RawMessage]) -> Vec<String> {
    let mut r: Vec<String> = letters
        .iter()
        .map(|m| m.headers.get_str(H_REASON).unwrap_or("<none>").to_string())
        .collect();
    r.sort();
    r
}

/// Permitted messages reach the handler with the right AuthContext, once each.
pub async fn permit(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("permit").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // one origin transaction: one context in the per-context mode
    let alice = env.subject("alice");
    for i in 0..5 {
        publish_in(b, &env, &ep, &alice, &format!("permit-{i}"), Headers::new()).await;
    }
    rec.wait_for(5, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    let seen = rec.snapshot();
    assert_eq!(seen.len(), 5, "[{}] handled {:?}", b.name(), seen.len());
    for h in &seen {
        assert_eq!(h.subject, "alice");
        assert_eq!(h.workload, crate::env::CONSUMER);
        assert_eq!(h.producer, crate::env::PRODUCER);
        assert_eq!(h.action, "test.process");
        assert!(h.scope.contains("test.process"));
        assert!(!h.txn.is_empty());
    }
    let mut bodies: Vec<_> = seen.iter().map(|h| h.payload.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        (0..5).map(|i| format!("permit-{i}")).collect::<Vec<_>>()
    );
    assert!(
        b.dead_letters(&ep, 0, Duration::from_millis(500))
            .await
            .unwrap_or_default()
            .is_empty()
    );
    let permitted: Vec<_> = env
        .decisions()
        .into_iter()
        .filter(|d| d.reason.code() == "permitted")
        .collect();
    assert_eq!(permitted.len(), 5);
    // per message: five signed references; per context: one, for all five
    let references: std::collections::HashSet<_> =
        permitted.iter().map(|d| d.ctx_ref_sha256.clone()).collect();
    let expected = match env.binding() {
        elevate_core::ctxbind::BindingMode::PerContext => 1,
        _ => 5,
    };
    assert_eq!(
        references.len(),
        expected,
        "[{}] {:?}",
        b.name(),
        env.binding()
    );
}

/// Denied messages never reach the handler and land in the dead letter with decision id and reason.
pub async fn deny(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("deny").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3 {
        // mallory is suspended: the subject half of trust elevation denies
        publish_for(
            b,
            &env,
            &ep,
            "mallory",
            &format!("deny-{i}"),
            Headers::new(),
        )
        .await;
    }
    let letters = b
        .dead_letters(&ep, 3, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    consumer.stop().await;
    assert_eq!(
        rec.count(),
        0,
        "[{}] a denied message reached the handler",
        b.name()
    );
    assert_eq!(reasons(&letters), vec!["subject-denied"; 3]);
    let logged: Vec<String> = env
        .decisions()
        .iter()
        .map(|d| d.decision_id.clone())
        .collect();
    for l in &letters {
        assert_eq!(l.headers.get_str(H_VERDICT), Some("deny"));
        let id = l
            .headers
            .get_str(H_DECISION_ID)
            .expect("decision id on the dead letter");
        assert!(
            logged.iter().any(|d| d == id),
            "dead letter's decision {id} is in the decision log"
        );
    }
}

/// Forged, tampered, token-carrying and reference-less messages from a plain producer: 0 handler calls.
pub async fn quarantine(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b
        .setup("quarantine")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let hostile = env.hostile_messages(&ep.destination);
    let n = hostile.len();
    for (_, headers, payload) in hostile.clone() {
        b.publish_raw(&ep, headers, payload)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let letters = b
        .dead_letters(&ep, n, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    consumer.stop().await;
    assert_eq!(
        rec.count(),
        0,
        "[{}] a hostile message reached the handler",
        b.name()
    );
    let mut expected: Vec<String> = hostile.iter().map(|(r, _, _)| r.to_string()).collect();
    expected.sort();
    assert_eq!(reasons(&letters), expected, "[{}]", b.name());
    for l in &letters {
        // the dead letter itself carries no credential
        assert!(env.credentials().scan(&l.headers, &l.payload).is_empty());
    }
}

/// TTS down: nothing handled, nothing dead-lettered, nothing lost; TTS back: everything completes.
pub async fn retry_then_recover(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("retry").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    env.stop_tts().await;
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..4 {
        publish_for(b, &env, &ep, "alice", &format!("retry-{i}"), Headers::new()).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rec.count(), 0, "[{}] handled without a Txn-Token", b.name());
    assert!(
        b.dead_letters(&ep, 0, Duration::from_millis(300))
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert!(
        env.decisions()
            .iter()
            .any(|d| d.reason.code() == "tts-unavailable")
    );
    env.start_tts().await;
    rec.wait_for(4, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    assert_eq!(
        rec.count(),
        4,
        "[{}] all messages complete after the TTS is back",
        b.name()
    );
    assert!(
        b.dead_letters(&ep, 0, Duration::from_millis(300))
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

/// An outage longer than the retry budget ends in a `retries-exhausted` dead letter, never a dispatch.
pub async fn retries_exhausted(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("exhausted").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    env.stop_tts().await;
    let processor = env.processor_with_retry(rec.handler(), TestEnv::short_retry());
    let consumer = b
        .start_consumer(&ep, processor)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publish_for(b, &env, &ep, "alice", "never", Headers::new()).await;
    let letters = b
        .dead_letters(&ep, 1, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    consumer.stop().await;
    assert_eq!(rec.count(), 0);
    assert_eq!(reasons(&letters), vec!["retries-exhausted"]);
}

/// No token the producer was given is on the wire, in any header or payload path.
pub async fn no_token_on_the_wire(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("wire").await.unwrap_or_else(|e| panic!("{e}"));
    let (headers, payload, secrets) = env.credential_laden_message();
    let subject = env.subject("alice");
    let audience = env.audience();
    let req = env.publish_request(&subject, &audience, &ep.destination);
    b.publish_guarded(
        &ep,
        &env.producer,
        &req,
        OutboundMessage { headers, payload },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let raw = b
        .read_raw(&ep, 1, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.len(), 1);
    for m in &raw {
        let mut wire = String::from_utf8_lossy(&m.payload).into_owned();
        for (n, v) in m.headers.iter() {
            wire.push_str(n);
            wire.push_str(&String::from_utf8_lossy(v));
        }
        for s in &secrets {
            assert!(
                !wire.contains(s.as_str()),
                "[{}] a credential reached the wire",
                b.name()
            );
        }
        assert!(
            m.headers.get(elevate_core::CTX_REF_HEADER).is_some(),
            "the reference is attached"
        );
        let bound = m
            .headers
            .get(elevate_core::ctxbind::CTX_BIND_HEADER)
            .is_some();
        assert_eq!(
            bound,
            env.binding() == elevate_core::ctxbind::BindingMode::PerContext,
            "[{}] a message binding rides exactly in the per-context mode",
            b.name()
        );
        assert!(env.credentials().scan(&m.headers, &m.payload).is_empty());
    }
}

/// Handled + dead-lettered = published, over a mixed stream.
pub async fn count_conservation(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("conserve").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let users = ["alice", "carol", "mallory", "bob"];
    let n = 40;
    for i in 0..n {
        publish_for(
            b,
            &env,
            &ep,
            users[i % users.len()],
            &format!("c-{i}"),
            Headers::new(),
        )
        .await;
    }
    // alice and carol are permitted test.process; mallory is suspended; bob lacks the entitlement
    let expected_denied = n / 2;
    let letters = b
        .dead_letters(&ep, expected_denied, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rec.wait_for(n - expected_denied, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    assert_eq!(rec.count(), n - expected_denied, "[{}]", b.name());
    assert_eq!(letters.len(), expected_denied, "[{}]", b.name());
    assert_eq!(rec.count() + letters.len(), n);
    assert_eq!(
        rec.distinct_payloads(),
        n - expected_denied,
        "[{}] no message handled twice",
        b.name()
    );
}

/// Everything of a letter as text (headers and payload), to search for secrets.
fn letter_text(l: &RawMessage) -> String {
    let mut all = String::from_utf8_lossy(&l.payload).into_owned();
    for (n, v) in l.headers.iter() {
        all.push_str(n);
        all.push(':');
        all.push_str(&String::from_utf8_lossy(v));
        all.push('\n');
    }
    all
}

/// Messages built to slip a credential past the scan (a scheme followed by
/// a tab or another whitespace, a UTF-8 byte-order mark, JSON nested past the
/// parser's limit, a JWT in any JSON value, a Txn-Token in the reference
/// header) are dead-lettered with the precise reason, no credential reaches
/// the handler or a dead letter (each removal listed by SHA-256), and the
/// messages behind them are handled: handled + dead-lettered = published.
pub async fn scan_fails_closed(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("evasive").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let evasive = env.evasive_messages(&ep.destination);
    for m in &evasive {
        b.publish_raw(&ep, m.headers.clone(), m.payload.clone())
            .await
            .unwrap_or_else(|e| panic!("[{}] {e}", b.name()));
    }
    for i in 0..3 {
        publish_for(
            b,
            &env,
            &ep,
            "alice",
            &format!("behind-{i}"),
            Headers::new(),
        )
        .await;
    }
    let letters = b
        .dead_letters(&ep, evasive.len(), SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rec.wait_for(3, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    let mut expected: Vec<String> = evasive.iter().map(|m| m.reason.to_string()).collect();
    expected.sort();
    assert_eq!(reasons(&letters), expected, "[{}]", b.name());
    assert_eq!(
        rec.count(),
        3,
        "[{}] the messages behind are handled",
        b.name()
    );
    assert_eq!(rec.count() + letters.len(), evasive.len() + 3);
    for h in rec.snapshot() {
        assert!(h.payload.starts_with("behind-"), "[{}] {h:?}", b.name());
    }
    let all: String = letters.iter().map(letter_text).collect();
    for m in &evasive {
        assert!(
            !all.contains(&m.secret),
            "[{}] a credential reached a dead letter ({})",
            b.name(),
            m.reason
        );
        let sha = elevate_core::keys::sha256_hex(m.secret.as_bytes());
        let listed = letters.iter().any(|l| {
            l.headers
                .get_str(H_REMOVED)
                .is_some_and(|r| r.contains(&sha))
                || l.headers.get_str(H_PAYLOAD).is_some()
        });
        assert!(
            listed,
            "[{}] {}: the removal is listed by SHA-256",
            b.name(),
            m.reason
        );
    }
}

/// Originals at the broker's limits give dead letters that still fit: an
/// oversized header is replaced by its name, length and SHA-256; an
/// oversized payload moves to the claim check (where the binding has one);
/// the envelope is always kept; the consumer goes on with the messages behind.
pub async fn oversized_dead_letters(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("oversized").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let limits = b.limits();
    let big = "h".repeat(limits.header_bytes);
    let headers: Headers = [("x-big", big.clone())].into_iter().collect();
    b.publish_raw(&ep, headers, br#"{"job":"big-header"}"#.to_vec())
        .await
        .unwrap_or_else(|e| panic!("[{}] {e}", b.name()));
    let payload = limits.payload_bytes.map(|n| vec![b'p'; n]);
    if let Some(p) = &payload {
        b.publish_raw(&ep, Headers::new(), p.clone())
            .await
            .unwrap_or_else(|e| panic!("[{}] {e}", b.name()));
    }
    for i in 0..2 {
        publish_for(
            b,
            &env,
            &ep,
            "alice",
            &format!("behind-{i}"),
            Headers::new(),
        )
        .await;
    }
    let n = 1 + usize::from(payload.is_some());
    let letters = b
        .dead_letters(&ep, n, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rec.wait_for(2, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    assert_eq!(
        rec.count(),
        2,
        "[{}] the messages behind are handled",
        b.name()
    );
    assert_eq!(
        reasons(&letters),
        vec!["missing-context"; n],
        "[{}]",
        b.name()
    );
    for l in &letters {
        for h in [
            H_DECISION_ID,
            H_REASON,
            H_VERDICT,
            H_SOURCE,
            H_IDEMPOTENCY_KEY,
        ] {
            assert!(l.headers.get(h).is_some(), "[{}] {h} kept", b.name());
        }
    }
    if !limits.enforced {
        return;
    }
    let header_letter = letters
        .iter()
        .find(|l| l.headers.get("x-big").is_none() && l.headers.get(H_TRIMMED).is_some())
        .unwrap_or_else(|| panic!("[{}] the big header was trimmed from its letter", b.name()));
    let trimmed = header_letter.headers.get_str(H_TRIMMED).unwrap_or_default();
    assert!(
        trimmed.contains("x-big")
            && trimmed.contains(&elevate_core::keys::sha256_hex(big.as_bytes()))
            && trimmed.contains(&big.len().to_string()),
        "[{}] {trimmed}",
        b.name()
    );
    if let Some(p) = &payload {
        let moved = letters
            .iter()
            .find_map(|l| {
                l.headers
                    .get(H_PAYLOAD)
                    .and_then(|v| serde_json::from_slice::<PayloadRef>(v).ok())
            })
            .unwrap_or_else(|| panic!("[{}] the big payload left its letter", b.name()));
        assert_eq!(moved.length, p.len());
        assert_eq!(moved.sha256, elevate_core::keys::sha256_hex(p));
        if limits.claim_check {
            assert!(
                matches!(moved.at, PayloadAt::ClaimCheck { .. }),
                "[{}] {moved:?}",
                b.name()
            );
        }
    }
}

/// Shutdown is the runtime's on every broker: a consumer stopped while
/// messages are in flight and buffered returns within its grace, and a new
/// consumer handles whatever the first did not finish: nothing is lost or
/// dead-lettered (core NATS drains what the server already pushed).
pub async fn shutdown_loses_nothing(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("shutdown").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let n = 12;
    let first = b
        .start_consumer(
            &ep,
            env.processor(rec.slow_handler(Duration::from_millis(300))),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..n {
        let user = if i % 2 == 0 { "alice" } else { "carol" };
        publish_for(b, &env, &ep, user, &format!("s-{i}"), Headers::new()).await;
    }
    rec.wait_for(1, SETTLE_TIMEOUT).await;
    let stopping = std::time::Instant::now();
    first.stop().await;
    let stopped_in = stopping.elapsed();
    assert!(
        stopped_in < Duration::from_secs(15),
        "[{}] stop took {stopped_in:?}",
        b.name()
    );
    let second = b
        .start_consumer(&ep, env.processor(rec.handler()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crate::wait::poll_until(SETTLE_TIMEOUT, Duration::from_millis(50), || {
        rec.distinct_payloads() >= n
    })
    .await;
    second.stop().await;
    assert_eq!(
        rec.distinct_payloads(),
        n,
        "[{}] every message handled",
        b.name()
    );
    assert!(
        b.dead_letters(&ep, 0, Duration::from_millis(300))
            .await
            .unwrap_or_default()
            .is_empty(),
        "[{}] nothing dead-lettered",
        b.name()
    );
}

/// A handler that panics is the runtime's rule on every broker: that
/// message is dead-lettered `handler-failed`, the consumer goes on with
/// the messages behind it.
pub async fn handler_panic_dead_letters(b: &dyn BrokerBinding) {
    let env = TestEnv::start().await;
    let ep = b.setup("panic").await.unwrap_or_else(|e| panic!("{e}"));
    let rec = Recorder::new();
    let consumer = b
        .start_consumer(&ep, env.processor(rec.slow_handler(Duration::ZERO)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publish_for(b, &env, &ep, "alice", "panic", Headers::new()).await;
    for i in 0..3 {
        publish_for(b, &env, &ep, "alice", &format!("after-{i}"), Headers::new()).await;
    }
    let letters = b
        .dead_letters(&ep, 1, SETTLE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rec.wait_for(3, SETTLE_TIMEOUT).await;
    consumer.stop().await;
    assert_eq!(reasons(&letters), vec!["handler-failed"], "[{}]", b.name());
    assert_eq!(
        rec.distinct_payloads(),
        3,
        "[{}] the messages behind it are handled",
        b.name()
    );
}

/// Runs every scenario in turn (for bindings that prefer one test).
pub async fn run_all(b: Arc<dyn BrokerBinding>) {
    permit(b.as_ref()).await;
    deny(b.as_ref()).await;
    quarantine(b.as_ref()).await;
    retry_then_recover(b.as_ref()).await;
    retries_exhausted(b.as_ref()).await;
    no_token_on_the_wire(b.as_ref()).await;
    count_conservation(b.as_ref()).await;
    scan_fails_closed(b.as_ref()).await;
    oversized_dead_letters(b.as_ref()).await;
    shutdown_loses_nothing(b.as_ref()).await;
    handler_panic_dead_letters(b.as_ref()).await;
}

/// Declares one `#[tokio::test]` per scenario and binding mode for a broker
/// binding constructor: `conformance::per_message::permit`,
/// `conformance::per_context::permit`, ….
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            mod per_message {
                #[allow(unused_imports)]
                use super::*;
                $crate::conformance_suite!(@test $make, PerMessage, permit, deny, quarantine, retry_then_recover, retries_exhausted, no_token_on_the_wire, count_conservation, scan_fails_closed, oversized_dead_letters, shutdown_loses_nothing, handler_panic_dead_letters);
            }
            mod per_context {
                #[allow(unused_imports)]
                use super::*;
                $crate::conformance_suite!(@test $make, PerContext, permit, deny, quarantine, retry_then_recover, retries_exhausted, no_token_on_the_wire, count_conservation, scan_fails_closed, oversized_dead_letters, shutdown_loses_nothing, handler_panic_dead_letters);
            }
        }
    };
    (@test $make:expr, $mode:ident, $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::env::with_binding(
                    elevate_core::ctxbind::BindingMode::$mode,
                    async {
                        let binding = $make.await;
                        $crate::conformance::$name(&binding).await;
                    },
                )
                .await;
            }
        )*
    };
}
