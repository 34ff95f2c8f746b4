//! The machine-readable summary (`--json PATH`):
//!
//! ```json
//! {"rows": [{"broker": "memory", "scenario": "repeated", "tts": "in-process",
//!            "binding": "per-message", "raw_msgs_per_s": 1.0, "guarded_msgs_per_s": 1.0,
//!            "raw_cpu_us": 1.0, "guarded_cpu_us": 1.0, "added_p50_ms": 0.1,
//!            "added_p99_ms": 0.2, "handled": 1, "dead_lettered": 0, "produced": 1,
//!            "decision_log": "file", "tts_replicas": null, "label": "…",
//!            "concurrency": 32, "payload_bytes": 95, "added_cpu_us": 1.0,
//!            "added_cpu_floor_multiple": 1.0, "problem": null}],
//!  "floor": {"verify_es256_us": 1.0, "verify_eddsa_us": 1.0, "mac_us": 1.0,
//!            "cedar_elevation_us": 1.0, "cache_hit_us": 1.0}}
//! ```
//!
//! `scenario` is `repeated`, `distinct` or `baseline` (the remote PDP);
//! `tts` is `in-process` or `http` — the fleet rows are `http` (the
//! `txn-token-service` binary over HTTP) with `tts_replicas` their number
//! of replicas (`null` on every other row); `binding` is `per-message` or
//! `per-context`; `decision_log` is `file`, `spool-fsync` or
//! `spool-no-fsync`. Numbers are JSON numbers; `null` only where a value
//! cannot exist (a rate or latency of a row that failed before measuring
//! it, the floor multiple without a floor).

use serde_json::{Value, json};

use crate::floor::Floor;
use crate::row::Row;
use crate::scenario::{Contexts, LogMode, PdpMode, TtsMode};

/// A number, or `null` when it is not finite.
fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

/// One row of the summary.
pub fn row(r: &Row, floor: Option<&Floor>) -> Value {
    let sc = &r.scenario;
    let scenario = match (sc.pdp, sc.contexts) {
        (PdpMode::Remote, _) => "baseline",
        (PdpMode::Local, Contexts::Repeated) => "repeated",
        (PdpMode::Local, Contexts::Distinct) => "distinct",
    };
    let (tts, replicas) = match sc.tts {
        TtsMode::InProcess => ("in-process", None),
        TtsMode::Http => ("http", None),
        TtsMode::Fleet { replicas } => ("http", Some(replicas)),
    };
    let decision_log = match sc.log {
        LogMode::File => "file",
        LogMode::Spool => "spool-fsync",
        LogMode::SpoolNoFsync => "spool-no-fsync",
    };
    let measured = r.raw_rate.is_some() && r.guarded_rate.is_some();
    let cpu = |x: f64| if measured { num(x) } else { Value::Null };
    let added = r.added_cpu_us();
    json!({
        "broker": r.broker,
        "scenario": scenario,
        "tts": tts,
        "tts_replicas": replicas,
        "binding": sc.binding.as_str(),
        "decision_log": decision_log,
        "label": sc.label(),
        "raw_msgs_per_s": opt(r.raw_rate),
        "guarded_msgs_per_s": opt(r.guarded_rate),
        "raw_cpu_us": cpu(r.raw_cpu_us),
        "guarded_cpu_us": cpu(r.guarded_cpu_us),
        "added_cpu_us": opt(added),
        "added_cpu_floor_multiple": opt(added.zip(floor).map(|(a, f)| a / f.bound_us(sc.binding))),
        "added_p50_ms": opt(r.added(false).map(|us| us / 1000.0)),
        "added_p99_ms": opt(r.added(true).map(|us| us / 1000.0)),
        "handled": r.handled,
        "dead_lettered": r.dead,
        "produced": r.produced,
        "concurrency": r.concurrency,
        "payload_bytes": r.payload_bytes,
        "problem": r.problem,
    })
}

/// The whole summary: every row of the main table and the floor (its five
/// fields `null` when the floor could not be measured).
pub fn summary(rows: &[Row], floor: Option<&Floor>) -> Value {
    let f = |get: fn(&Floor) -> f64| floor.map_or(Value::Null, |fl| num(get(fl)));
    json!({
        "rows": rows.iter().map(|r| row(r, floor)).collect::<Vec<_>>(),
        "floor": {
            "verify_es256_us": f(|x| x.verify_es256_us),
            "verify_eddsa_us": f(|x| x.verify_eddsa_us),
            "mac_us": f(|x| x.mac_us),
            "cedar_elevation_us": f(|x| x.cedar_elevation_us),
            "cache_hit_us": f(|x| x.cache_hit_us),
        },
    })
}

/// Checks `doc` against the summary's schema: the listed fields, with those
/// names, types and values. Used by the tests and by `bench` itself before
/// it writes the file.
///
/// # Errors
///
/// The first field that is missing, of the wrong type or out of its values.
pub fn check_schema(doc: &Value) -> Result<(), String> {
    let obj = doc.as_object().ok_or("summary is not an object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["floor", "rows"] {
        return Err(format!("top-level keys {keys:?}, want [floor, rows]"));
    }
    let floor = doc["floor"].as_object().ok_or("floor is not an object")?;
    for k in [
        "verify_es256_us",
        "verify_eddsa_us",
        "mac_us",
        "cedar_elevation_us",
        "cache_hit_us",
    ] {
        if !floor.get(k).is_some_and(Value::is_number) {
            return Err(format!("floor.{k} is not a number: {:?}", floor.get(k)));
        }
    }
    let rows = doc["rows"].as_array().ok_or("rows is not an array")?;
    for (i, r) in rows.iter().enumerate() {
        let field = |k: &str| r.get(k).ok_or_else(|| format!("rows[{i}].{k} missing"));
        let one_of = |k: &str, allowed: &[&str]| -> Result<(), String> {
            match field(k)?.as_str() {
                Some(v) if allowed.contains(&v) => Ok(()),
                other => Err(format!(
                    "rows[{i}].{k} = {other:?}, want one of {allowed:?}"
                )),
            }
        };
        if !field("broker")?.is_string() {
            return Err(format!("rows[{i}].broker is not a string"));
        }
        one_of("scenario", &["repeated", "distinct", "baseline"])?;
        one_of("tts", &["in-process", "http"])?;
        one_of("binding", &["per-message", "per-context"])?;
        one_of("decision_log", &["file", "spool-fsync", "spool-no-fsync"])?;
        let replicas = field("tts_replicas")?;
        if !(replicas.is_null() || replicas.is_u64()) {
            return Err(format!(
                "rows[{i}].tts_replicas = {replicas}, want null or a count"
            ));
        }
        for k in [
            "raw_msgs_per_s",
            "guarded_msgs_per_s",
            "raw_cpu_us",
            "guarded_cpu_us",
            "added_p50_ms",
            "added_p99_ms",
        ] {
            let v = field(k)?;
            if !(v.is_number() || v.is_null()) {
                return Err(format!("rows[{i}].{k} = {v}, want a number or null"));
            }
        }
        for k in ["handled", "dead_lettered", "produced"] {
            if !field(k)?.is_u64() {
                return Err(format!("rows[{i}].{k} is not a count"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Binding, Scenario};

    fn sc(contexts: Contexts, tts: TtsMode, pdp: PdpMode, log: LogMode) -> Scenario {
        Scenario {
            contexts,
            tts,
            pdp,
            log,
            binding: Binding::PerMessage,
        }
    }

    fn floor() -> Floor {
        Floor {
            verify_es256_us: 60.0,
            verify_eddsa_us: 36.0,
            mac_us: 0.5,
            cedar_elevation_us: 20.0,
            cache_hit_us: 2.0,
        }
    }

    fn measured(mut r: Row) -> Row {
        r.raw_rate = Some(10_000.0);
        r.guarded_rate = Some(5_000.0);
        r.raw_cpu_us = 10.0;
        r.guarded_cpu_us = 134.0;
        r.raw_p50 = Some(100.0);
        r.raw_p99 = Some(400.0);
        r.guarded_p50 = Some(600.0);
        r.guarded_p99 = Some(1_400.0);
        r.handled = 3_400;
        r.produced = 3_400;
        r
    }

    #[test]
    fn every_kind_of_row_has_the_schema_names_and_types() {
        use Contexts::*;
        let rows = vec![
            measured(Row::new(
                "memory",
                sc(Repeated, TtsMode::InProcess, PdpMode::Local, LogMode::File),
            )),
            measured(Row::new(
                "nats",
                sc(Repeated, TtsMode::InProcess, PdpMode::Local, LogMode::Spool),
            )),
            measured(Row::new(
                "nats",
                sc(
                    Distinct,
                    TtsMode::Fleet { replicas: 2 },
                    PdpMode::Local,
                    LogMode::SpoolNoFsync,
                ),
            )),
            measured(Row::new(
                "amqp",
                sc(Repeated, TtsMode::Http, PdpMode::Remote, LogMode::File),
            )),
            Row {
                problem: Some("broker down".into()),
                ..Row::new(
                    "kafka",
                    sc(Distinct, TtsMode::Http, PdpMode::Local, LogMode::File),
                )
            },
        ];
        let doc = summary(&rows, Some(&floor()));
        check_schema(&doc).unwrap();
        let r = &doc["rows"];
        assert_eq!(r[0]["scenario"], "repeated");
        assert_eq!(r[0]["tts"], "in-process");
        assert_eq!(r[0]["binding"], "per-message");
        assert_eq!(r[0]["decision_log"], "file");
        assert_eq!(r[1]["decision_log"], "spool-fsync");
        assert_eq!(r[2]["scenario"], "distinct");
        assert_eq!(r[2]["tts"], "http");
        assert_eq!(r[2]["tts_replicas"], 2);
        assert_eq!(r[2]["decision_log"], "spool-no-fsync");
        assert!(r[0]["tts_replicas"].is_null());
        assert_eq!(r[3]["scenario"], "baseline");
        assert_eq!(r[0]["added_p99_ms"], 1.0);
        assert_eq!(r[0]["added_cpu_us"], 124.0);
        // (134 - 10) / (60 + 2)
        assert_eq!(r[0]["added_cpu_floor_multiple"], 2.0);
        // a failed row: nothing measured is null, the counts are counts
        assert!(r[4]["raw_msgs_per_s"].is_null());
        assert!(r[4]["guarded_cpu_us"].is_null());
        assert_eq!(r[4]["produced"], 0);
        assert_eq!(doc["floor"]["verify_eddsa_us"], 36.0);
        // the written form parses back to the same document
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        check_schema(&back).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn the_schema_check_refuses_what_the_issue_does_not_allow() {
        let rows = vec![measured(Row::new(
            "memory",
            sc(
                Contexts::Repeated,
                TtsMode::InProcess,
                PdpMode::Local,
                LogMode::File,
            ),
        ))];
        let good = summary(&rows, Some(&floor()));
        check_schema(&good).unwrap();
        let broken = |edit: fn(&mut Value)| {
            let mut d = good.clone();
            edit(&mut d);
            check_schema(&d).is_err()
        };
        assert!(broken(|d| d["rows"][0]["tts"] = "fleet".into()));
        assert!(broken(|d| d["rows"][0]["scenario"] = "repeated ctx".into()));
        assert!(broken(|d| d["rows"][0]["handled"] = "3400".into()));
        assert!(broken(|d| d["rows"][0]["raw_cpu_us"] = "10".into()));
        assert!(broken(|d| {
            d["rows"][0].as_object_mut().unwrap().remove("produced");
        }));
        assert!(broken(|d| d["floor"]["mac_us"] = Value::Null));
        assert!(broken(|d| d["extra"] = 1.into()));
        // no floor: the summary says so with nulls, which the schema refuses
        assert!(check_schema(&summary(&rows, None)).is_err());
    }
}
