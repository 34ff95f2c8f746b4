//! The processes a drill starts, and how they are ended: by pid, when the
//! drill is done with them, when it fails, and when it is interrupted.
//!
//! Three layers: every [`Proc`] kills its process (and the descendants it
//! started, e.g. RabbitMQ's `beam.smp` under its start script) with SIGKILL
//! when dropped; every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with
//! the drill even when the drill itself is killed (the drill spawns from its
//! single runtime thread, which lives as long as the process); and every pid
//! is appended to a pid file (`pid<TAB>program`) that `scripts/drills` reads
//! on exit to end whatever is still running under that name.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the pids of started processes are recorded.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pidfile: Option<Arc<Mutex<PathBuf>>>,
}

impl Registry {
    /// Records pids in `pidfile` (appending).
    pub fn with_pidfile(pidfile: PathBuf) -> Self {
        Registry {
            pidfile: Some(Arc::new(Mutex::new(pidfile))),
        }
    }

    /// Records a PostgreSQL database the drill created (`db<TAB>name`), for
    /// the exit trap to drop if the drill could not.
    pub fn record_database(&self, name: &str) {
        self.record_line(&format!("db\t{name}"));
    }

    fn record_line(&self, line: &str) {
        let Some(path) = &self.pidfile else {
            return;
        };
        let Ok(path) = path.lock() else {
            return;
        };
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&*path) {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Records that `pid` runs `program`.
    pub fn record(&self, pid: u32, program: &str) {
        self.record_line(&format!("{pid}\t{program}"));
    }
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one this
    // drill started (a child, or a descendant found under it in /proc).
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "<pid> (<comm>) <state> <ppid> ..."; comm may contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Every live descendant of `pid` (children first, then theirs).
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let all: Vec<(u32, u32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (child, parent) in &all {
            if *parent == p && !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

/// A started process, killed (with its descendants) when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`
    /// (unless `cmd` already set them), in its own process group, dying with
    /// the drill (`PR_SET_PDEATHSIG`), and records its pid.
    pub fn spawn(
        mut cmd: Command,
        name: &str,
        log: &Path,
        registry: &Registry,
    ) -> std::io::Result<Proc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        Self::spawn_with_stdio(cmd, name, log, registry)
    }

    /// As [`Proc::spawn`], with the command's stdio left as the caller set it.
    pub fn spawn_with_stdio(
        mut cmd: Command,
        name: &str,
        log: &Path,
        registry: &Registry,
    ) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {name} ({:?}): {e}", cmd.get_program()),
            )
        })?;
        registry.record(child.id(), name);
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            started: Instant::now(),
            exited: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it is.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// How long ago it was started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Mutable access to the child (to take a piped stdout).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status, if it has exited (reaped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends a signal to the process itself.
    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// SIGKILL to every descendant and to the process, then reaps it.
    pub fn kill_hard(&mut self) {
        if self.exited().is_some() {
            return;
        }
        for d in descendants(self.pid()) {
            let _ = send_signal(d, libc::SIGKILL);
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// Waits (asynchronously, polling) up to `timeout` for it to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL. Returns
    /// whether it exited within the grace period.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        if self.exited().is_some() {
            return true;
        }
        let _ = self.signal(libc::SIGTERM);
        // A stopped process does not act on SIGTERM until continued.
        let _ = self.signal(libc::SIGCONT);
        if self.wait_exit(grace).await.is_some() {
            // Whatever it started and left behind goes too.
            for d in descendants(self.pid()) {
                let _ = send_signal(d, libc::SIGKILL);
            }
            return true;
        }
        self.kill_hard();
        false
    }

    /// The last `lines` lines of its log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The last `lines` lines of a file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether something accepts TCP connections at `addr`.
pub fn listening(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map(|mut a| {
            a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
        })
        .unwrap_or(false)
}

/// Waits up to `timeout` until `addr` accepts connections, failing early if
/// `proc` exits. With `record`, every process that appears under `proc`
/// meanwhile is recorded too (RabbitMQ's node runs under its start script).
pub async fn wait_listening(
    addr: &str,
    proc: &mut Proc,
    timeout: Duration,
    record: Option<(&Registry, &str)>,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < timeout {
        if let Some((registry, name)) = record {
            for d in descendants(proc.pid()) {
                if !seen.contains(&d) {
                    registry.record(d, name);
                    seen.push(d);
                }
            }
        }
        if listening(addr) {
            return Ok(started.elapsed());
        }
        if let Some(status) = proc.exited() {
            return Err(format!(
                "{} exited ({status}) before listening on {addr}; its log ends:\n{}",
                proc.name(),
                proc.log_tail(20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{} did not listen on {addr} within {timeout:?}; its log ends:\n{}",
        proc.name(),
        proc.log_tail(20)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_proc_takes_its_descendants_along() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sh.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 300 & sleep 300 & wait");
        let proc = Proc::spawn(cmd, "sh", &log, &Registry::default()).expect("spawn");
        let pid = proc.pid();
        let mut kids = Vec::new();
        for _ in 0..50 {
            kids = descendants(pid);
            if kids.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(kids.len(), 2, "two sleeps under the shell");
        drop(proc);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for k in kids {
            let state = std::fs::read_to_string(format!("/proc/{k}/stat")).unwrap_or_default();
            // gone, or a zombie waiting for init to reap it
            assert!(
                state.is_empty() || state.contains(") Z"),
                "{k} still runs: {state}"
            );
        }
    }
}
