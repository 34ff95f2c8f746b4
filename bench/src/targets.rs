//! Issue 16's targets (2 cores, loopback, one run), checked against the
//! rows and the floor of this run: each says met or missed, per broker.

use crate::floor::Floor;
use crate::row::Row;
use crate::scenario::{Binding, Contexts, LogMode, PdpMode, TtsMode};

fn ok(b: bool) -> &'static str {
    if b { "met" } else { "**missed**" }
}

/// The repeated-context rows of the best binding there is (per context when
/// the run has it), TTS in process, embedded PDP, file log.
fn repeated(rows: &[Row]) -> Vec<&Row> {
    let usable = |r: &&Row| {
        r.scenario.contexts == Contexts::Repeated
            && r.scenario.tts == TtsMode::InProcess
            && r.scenario.pdp == PdpMode::Local
            && r.scenario.log == LogMode::File
            && r.problem.is_none()
    };
    let per_context: Vec<&Row> = rows
        .iter()
        .filter(usable)
        .filter(|r| r.scenario.binding == Binding::PerContext)
        .collect();
    if per_context.is_empty() {
        rows.iter().filter(usable).collect()
    } else {
        per_context
    }
}

/// One line per target, each listing what every broker measured.
pub fn targets(rows: &[Row], floor: Option<&Floor>) -> String {
    let mut s = String::new();
    let rep = repeated(rows);
    let list = |f: &dyn Fn(&Row) -> Option<String>, of: &[&Row]| -> String {
        of.iter()
            .filter_map(|r| f(r).map(|v| format!("{} {v}", r.broker)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let binding = rep
        .first()
        .map(|r| r.scenario.binding.as_str())
        .unwrap_or("none");
    let cpu_ok = !rep.is_empty()
        && rep
            .iter()
            .all(|r| r.added_cpu_us().is_some_and(|x| x <= 15.0));
    s.push_str(&format!(
        "- repeated context ({binding}), added CPU ≤ 15 µs per message on every broker: {} ({})\n",
        ok(cpu_ok),
        list(&|r| r.added_cpu_us().map(|x| format!("{x:.0} µs")), &rep)
    ));
    let ratio_rows: Vec<&Row> = rep
        .iter()
        .copied()
        .filter(|r| r.broker == "amqp" || r.broker == "nats")
        .collect();
    let ratio_ok = !ratio_rows.is_empty()
        && ratio_rows
            .iter()
            .all(|r| r.ratio().is_some_and(|x| x >= 0.5));
    s.push_str(&format!(
        "- repeated context, guarded/raw ≥ 0.5 on RabbitMQ and NATS JetStream: {} ({})\n",
        ok(ratio_ok),
        list(&|r| r.ratio().map(|x| format!("{x:.2}")), &ratio_rows)
    ));
    let p99_ok = !rep.is_empty()
        && rep
            .iter()
            .all(|r| r.added(true).is_some_and(|x| x <= 1000.0));
    s.push_str(&format!(
        "- repeated context, added p99 ≤ 1 ms: {} ({})\n",
        ok(p99_ok),
        list(
            &|r| r.added(true).map(|x| format!("{:.2} ms", x / 1000.0)),
            &rep
        )
    ));
    for (tts, floor_rate, name) in [
        (TtsMode::InProcess, 5000.0, "the in-process TTS"),
        (TtsMode::Http, 4000.0, "the TTS over HTTP"),
    ] {
        let distinct: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.scenario.contexts == Contexts::Distinct
                    && r.scenario.tts == tts
                    && r.scenario.pdp == PdpMode::Local
                    && r.scenario.binding == Binding::PerMessage
                    && r.problem.is_none()
            })
            .collect();
        let met = !distinct.is_empty()
            && distinct
                .iter()
                .all(|r| r.guarded_rate.is_some_and(|x| x >= floor_rate));
        s.push_str(&format!(
            "- distinct context, ≥ {floor_rate:.0} msgs/s guarded on every broker with {name}: {} ({})\n",
            ok(met),
            list(&|r| r.guarded_rate.map(|x| format!("{x:.0}")), &distinct)
        ));
    }
    match floor {
        Some(f) => {
            let uncached = 1e6 / f.cedar_elevation_us;
            let cached = 1e6 / f.cache_hit_us;
            s.push_str(&format!(
                "- decision path alone, uncached trust elevation ≥ 50,000/s per core: {} ({uncached:.0}/s); cached ≥ 500,000/s: {} ({cached:.0}/s)\n",
                ok(uncached >= 50_000.0),
                ok(cached >= 500_000.0)
            ));
        }
        None => s.push_str("- decision path alone: not measured (no floor in this run)\n"),
    }
    s
}
