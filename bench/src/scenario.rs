//! What a row measures: how many messages share an origin transaction, how
//! the guard reaches the TTS, and which PDP it asks.

use crate::BrokerKind;

/// Messages per origin transaction in the repeated-context scenario.
pub const PER_CONTEXT: usize = 100;

/// How many messages share an origin transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contexts {
    /// 100 messages per origin transaction: one Txn-Token serves them all.
    Repeated,
    /// Every message its own origin transaction: one token exchange each.
    Distinct,
}

/// How the guard gets its Txn-Tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtsMode {
    /// The TTS's issuer called in process.
    InProcess,
    /// The TTS over HTTP on loopback.
    Http,
}

/// Which PDP the guard asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdpMode {
    /// The embedded Cedar PDP.
    Local,
    /// The status quo: an AuthZEN call over HTTP per message.
    Remote,
}

/// One row's scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// How many messages share an origin transaction.
    pub contexts: Contexts,
    /// How the guard gets its Txn-Tokens.
    pub tts: TtsMode,
    /// Which PDP the guard asks.
    pub pdp: PdpMode,
}

impl Scenario {
    /// The row's label in the table.
    pub fn label(&self) -> String {
        let ctx = match self.contexts {
            Contexts::Repeated => "repeated ctx",
            Contexts::Distinct => "distinct ctx",
        };
        let tts = match self.tts {
            TtsMode::InProcess => "TTS in-process",
            TtsMode::Http => "TTS HTTP",
        };
        match self.pdp {
            PdpMode::Local => format!("{ctx}, {tts}"),
            PdpMode::Remote => format!("baseline: remote PDP (HTTP), {ctx}, {tts}"),
        }
    }
}

/// The rows of one broker: all five in full mode; in quick mode two, and
/// the remote-PDP baseline on the in-memory transport only.
pub fn scenarios(quick: bool, broker: BrokerKind) -> Vec<Scenario> {
    let s = |contexts, tts, pdp| Scenario { contexts, tts, pdp };
    use Contexts::*;
    use PdpMode::*;
    use TtsMode::*;
    if quick {
        let mut v = vec![s(Repeated, InProcess, Local), s(Distinct, Http, Local)];
        if broker == BrokerKind::Memory {
            v.push(s(Repeated, InProcess, Remote));
        }
        v
    } else {
        vec![
            s(Repeated, InProcess, Local),
            s(Repeated, Http, Local),
            s(Distinct, InProcess, Local),
            s(Distinct, Http, Local),
            s(Repeated, InProcess, Remote),
        ]
    }
}
