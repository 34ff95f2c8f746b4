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
    /// The `txn-token-service` binary as separate processes on one
    /// PostgreSQL (`[store]`), `replicas` of them, the client spreading its
    /// exchanges round-robin over them ([`crate::fleet`]).
    Fleet {
        /// How many replicas the client uses (1 or 2).
        replicas: usize,
    },
}

/// Which PDP the guard asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdpMode {
    /// The embedded Cedar PDP.
    Local,
    /// The status quo: an AuthZEN call over HTTP per message.
    Remote,
}

/// Where the guard records its decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// A JSON Lines file, written and flushed per record (`FileSink`).
    File,
    /// The durable decision spool (`elevate_core::decision::Spool`): group
    /// commit with one `fdatasync` per batch, hash chain, shipped over HTTP
    /// (gzipped batches) to a receiver on loopback.
    Spool,
    /// The same spool with `fsync = false` (written to the OS per batch:
    /// survives a process crash, not a machine crash), to tell the flush's
    /// cost from the rest.
    SpoolNoFsync,
}

/// How a message is bound to its context: the unit the guard's floor is
/// counted in ([`crate::floor::Floor::bound_us`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Every message carries its own signed context reference (ES256): one
    /// signature verification per message.
    PerMessage,
    /// One signed context reference per origin context (its binding key
    /// JWE-wrapped to the consumer), a MAC per message
    /// (`elevate_core::ctxbind`).
    PerContext,
}

impl Binding {
    /// The name in the JSON summary (`"per-message"`, `"per-context"`).
    pub fn as_str(self) -> &'static str {
        self.mode().as_str()
    }

    /// The producer's mode for this binding.
    pub fn mode(self) -> elevate_core::ctxbind::BindingMode {
        match self {
            Binding::PerMessage => elevate_core::ctxbind::BindingMode::PerMessage,
            Binding::PerContext => elevate_core::ctxbind::BindingMode::PerContext,
        }
    }
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
    /// Where decisions are recorded.
    pub log: LogMode,
    /// How messages are bound to their context.
    pub binding: Binding,
}

impl Scenario {
    /// The row's label in the table.
    pub fn label(&self) -> String {
        let ctx = match self.contexts {
            Contexts::Repeated => "repeated ctx",
            Contexts::Distinct => "distinct ctx",
        };
        let tts = match self.tts {
            TtsMode::InProcess => "TTS in-process".to_string(),
            TtsMode::Http => "TTS HTTP".to_string(),
            TtsMode::Fleet { replicas: 1 } => "TTS 1 replica on PostgreSQL".to_string(),
            TtsMode::Fleet { replicas } => format!("TTS {replicas} replicas on PostgreSQL"),
        };
        let log = match self.log {
            LogMode::File => "",
            LogMode::Spool => ", spool (fsync) + HTTP shipping",
            LogMode::SpoolNoFsync => ", spool (no fsync) + HTTP shipping",
        };
        let binding = match self.binding {
            Binding::PerMessage => "",
            Binding::PerContext => ", per-context binding",
        };
        match self.pdp {
            PdpMode::Local => format!("{ctx}, {tts}{log}{binding}"),
            PdpMode::Remote => format!("baseline: remote PDP (HTTP), {ctx}, {tts}{log}{binding}"),
        }
    }
}

/// The rows of one broker: all eleven in full mode (the first repeated
/// per context, and with the decision spool, with and without fsync, instead of the file;
/// distinct contexts per context too;
/// distinct contexts with the TTS in process, over HTTP in this process, and
/// as the `txn-token-service` binary on PostgreSQL, one replica and two); in
/// quick mode three (repeated per message and per context, distinct over HTTP), and the remote-PDP baseline, the spool row and the
/// two-replica row on the in-memory transport only.
pub fn scenarios(quick: bool, broker: BrokerKind) -> Vec<Scenario> {
    let s = |contexts, tts, pdp| Scenario {
        contexts,
        tts,
        pdp,
        log: LogMode::File,
        binding: Binding::PerMessage,
    };
    let spooled = |sc: Scenario| Scenario {
        log: LogMode::Spool,
        ..sc
    };
    let unsynced = |sc: Scenario| Scenario {
        log: LogMode::SpoolNoFsync,
        ..sc
    };
    let per_context = |sc: Scenario| Scenario {
        binding: Binding::PerContext,
        ..sc
    };
    use Contexts::*;
    use PdpMode::*;
    use TtsMode::*;
    if quick {
        let mut v = vec![
            s(Repeated, InProcess, Local),
            per_context(s(Repeated, InProcess, Local)),
            s(Distinct, Http, Local),
        ];
        if broker == BrokerKind::Memory {
            v.push(spooled(s(Repeated, InProcess, Local)));
            v.push(s(Repeated, InProcess, Remote));
            // Kept in CI's quick (debug) run, well under 30 s: building
            // txn-token-service only links it (the benchmark's build has
            // its dependencies), and starting two replicas plus this
            // 250-message row took 2.7 s where the TTS HTTP row takes 1.6 s.
            // It needs the local PostgreSQL, as the tests before it do.
            v.push(s(Distinct, Fleet { replicas: 2 }, Local));
        }
        v
    } else {
        vec![
            s(Repeated, InProcess, Local),
            per_context(s(Repeated, InProcess, Local)),
            spooled(s(Repeated, InProcess, Local)),
            unsynced(s(Repeated, InProcess, Local)),
            s(Repeated, Http, Local),
            s(Distinct, InProcess, Local),
            per_context(s(Distinct, InProcess, Local)),
            s(Distinct, Http, Local),
            s(Distinct, Fleet { replicas: 1 }, Local),
            s(Distinct, Fleet { replicas: 2 }, Local),
            s(Repeated, InProcess, Remote),
        ]
    }
}
