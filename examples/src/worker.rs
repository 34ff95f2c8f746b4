//! The guarded worker's side of the broker examples: a handler that prints
//! and counts what it is given, a consumer task that runs until told to stop,
//! and the end-of-run report of dead letters and counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use elevate_core::deadletter::{H_REASON, H_SOURCE, H_VERDICT};
use elevate_core::{AuthContext, Handler, Headers, InboundMessage, handler_fn};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::wiring::WiringError;

/// How many messages a [`permit_printer`] handled so far.
#[derive(Clone, Default)]
pub struct Handled(Arc<AtomicUsize>);

impl Handled {
    /// The count so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits (polling) until at least `n` were handled or `deadline` passed.
    pub async fn wait_for(&self, n: usize, deadline: tokio::time::Instant) {
        while self.get() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A handler printing `PERMIT <payload> for <subject> <where> (txn …, scope "…")` for
/// every message it is given, `place` saying where the message came from; and its count.
pub fn permit_printer(place: fn(&InboundMessage) -> String) -> (Handled, impl Handler + 'static) {
    let handled = Handled::default();
    let counter = handled.clone();
    let handler = handler_fn(move |msg: InboundMessage, auth: AuthContext| {
        let counter = counter.clone();
        async move {
            println!(
                "  PERMIT  {} for {} {} (txn {}, scope \"{}\")",
                String::from_utf8_lossy(&msg.payload),
                auth.subject(),
                place(&msg),
                auth.txn(),
                auth.scope()
            );
            counter.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    (handled, handler)
}

/// The future a [`Running`] task is given: it completes when the task is told to stop.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A spawned consumer loop and the means to stop it.
pub struct Running<T> {
    stop: oneshot::Sender<()>,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Running<T> {
    /// Spawns `run(stop signal)`, e.g. `|stopped| consumer.run(stopped)`.
    pub fn spawn<F>(run: impl FnOnce(StopSignal) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async {
            let _ = stopped.await;
        })));
        Running { stop, task }
    }

    /// Tells the task to stop and waits for what it returned.
    pub async fn stop(self) -> Result<T, tokio::task::JoinError> {
        let _ = self.stop.send(());
        self.task.await
    }
}

/// Prints one dead letter: verdict, reason, payload and where it came from.
pub fn print_dead_letter(headers: &Headers, payload: &[u8]) {
    println!(
        "  {} / {}: {} (from {})",
        headers.get_str(H_VERDICT).unwrap_or("?"),
        headers.get_str(H_REASON).unwrap_or("?"),
        String::from_utf8_lossy(payload),
        headers.get_str(H_SOURCE).unwrap_or("?")
    );
}

/// Prints the final counts and fails unless they are what the policy says they must be.
pub fn report(
    published: usize,
    handled: usize,
    dead: usize,
    expected_handled: usize,
) -> Result<(), WiringError> {
    let expected_dead = published.saturating_sub(expected_handled);
    println!("\npublished {published}, handled {handled}, dead-lettered {dead}");
    if handled != expected_handled || dead != expected_dead {
        return Err(format!(
            "unexpected outcome: expected {expected_handled} handled and {expected_dead} dead-lettered"
        )
        .into());
    }
    Ok(())
}
