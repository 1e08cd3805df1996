//! The OCI runtime as the task service uses it: the runc command line (one method per subcommand, no
//! shell, bounded time) behind a trait the pause task (pause.rs) implements too.

use std::os::fd::RawFd;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::reaper::{self, CmdError, Exit, Reaper};
use crate::{cgroup_kill, reaped_delete};

/// Upper bound of one CRIU dump or restore; the ttrpc deadline of the call normally ends it sooner.
const CRIU_TIMEOUT: Duration = Duration::from_secs(600);

/// stdin, stdout, stderr handed to the runtime for the container's process.
pub type Stdio = [RawFd; 3];

#[derive(Debug)]
pub enum RtError {
    /// The runtime ran and failed; the message names the command and runc's own error.
    Failed(String),
    TimedOut(String),
}

impl std::fmt::Display for RtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RtError::Failed(m) | RtError::TimedOut(m) => f.write_str(m),
        }
    }
}

pub type RtResult<T> = Result<T, RtError>;

#[derive(Clone, Debug)]
pub struct RuncOptions {
    pub binary: String,
    pub root: String,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
}

impl RuncOptions {
    pub fn new(namespace: &str) -> Self {
        RuncOptions {
            binary: "runc".into(),
            root: format!("/run/containerd/runc/{namespace}"),
            systemd_cgroup: false,
            no_pivot_root: false,
            no_new_keyring: false,
        }
    }
}

/// What a runtime lets the task service do itself.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Create may be `run --detach` for a task started right after its creation anyway.
    pub runs_detached: bool,
    /// A task's pids are host processes this shim reaps, which it may signal itself.
    pub signals_directly: bool,
    /// Creating a task moves a process into cgroups while the caller waits (cgroup_lock.rs).
    pub moves_into_cgroups: bool,
    /// A reaped container may be deleted without a runc process when its spec allows it.
    pub deletes_reaped_itself: bool,
    /// A signal to every process of a container may be sent without a runc process.
    pub signals_cgroup_itself: bool,
    /// The runtime binary keeps state of the task (`shim delete` reads options.json then).
    pub binary_keeps_state: bool,
}

impl Caps {
    pub const RUNC: Caps = Caps {
        runs_detached: true,
        signals_directly: true,
        moves_into_cgroups: true,
        deletes_reaped_itself: true,
        signals_cgroup_itself: true,
        binary_keeps_state: true,
    };
}

#[async_trait]
pub trait Runtime: Send + Sync {
    /// What made the task, for the shim's log.
    fn label(&self) -> String;
    /// What the task service may do around this runtime.
    fn caps(&self) -> Caps {
        Caps::RUNC
    }
    /// Set by runtimes that cannot checkpoint one container: the reason.
    fn checkpoint_unsupported(&self) -> String {
        String::new()
    }
    fn watch_exit(&self, pid: i32) -> oneshot::Receiver<Exit>;
    async fn create(&self, cid: &str, bundle: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()>;
    async fn run_detached(&self, cid: &str, bundle: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()>;
    /// The pid of the process create, run, exec or restore just started.
    async fn started_pid(&self, pid_file: &str) -> RtResult<i32>;
    async fn start(&self, cid: &str) -> RtResult<()>;
    async fn exec(&self, cid: &str, process_file: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()>;
    async fn kill(&self, cid: &str, sig: i32, all: bool) -> RtResult<()>;
    /// `kill --all` done without runc where possible; returns "" or why runc had to do it.
    async fn kill_all(&self, cid: &str, sig: i32) -> RtResult<String>;
    async fn delete(&self, cid: &str, force: bool) -> RtResult<()>;
    /// `delete --force` of a reaped container without runc where possible; "" or why runc had to.
    async fn delete_reaped(&self, cid: &str, own_pid_ns: bool) -> RtResult<String>;
    async fn pause(&self, cid: &str) -> RtResult<()>;
    async fn resume(&self, cid: &str) -> RtResult<()>;
    async fn update(&self, cid: &str, resources_json: Vec<u8>) -> RtResult<()>;
    async fn ps(&self, cid: &str) -> RtResult<Vec<i32>>;
    async fn checkpoint(
        &self,
        cid: &str,
        image_path: &str,
        work_path: &str,
        leave_running: bool,
        file_locks: bool,
    ) -> RtResult<()>;
    #[allow(clippy::too_many_arguments)]
    async fn restore(
        &self,
        cid: &str,
        bundle: &str,
        image_path: &str,
        work_path: &str,
        pid_file: &str,
        stdio: Stdio,
        console: &str,
    ) -> RtResult<()>;
    /// Stops background work of this runtime.
    fn close(&self) {}
}

pub struct Runc {
    pub reaper: Reaper,
    pub opts: RuncOptions,
    pub log_path: String,
    pub timeout: Duration,
}

impl Runc {
    pub fn new(reaper: Reaper, opts: RuncOptions, log_path: String, timeout: Duration) -> Self {
        Runc { reaper, opts, log_path, timeout }
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![
            self.opts.binary.clone(),
            "--root".into(),
            self.opts.root.clone(),
            "--log".into(),
            self.log_path.clone(),
            "--log-format".into(),
            "json".into(),
        ];
        if self.opts.systemd_cgroup {
            argv.push("--systemd-cgroup".into());
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// runc writes its errors to --log as JSON lines; the last error is the useful one.
    fn last_error(&self) -> String {
        last_error_in(&self.log_path)
    }

    async fn run(
        &self,
        args: &[&str],
        stdin: Option<Vec<u8>>,
        stdio: Option<Stdio>,
        timeout: Duration,
    ) -> RtResult<Vec<u8>> {
        match reaper::run(&self.reaper, &self.argv(args), timeout, stdin, stdio).await {
            Ok(out) => Ok(out.stdout),
            Err(CmdError::TimedOut(m)) => Err(RtError::TimedOut(m)),
            Err(CmdError::Failed { status, stderr, .. }) => {
                let mut detail = self.last_error();
                if detail.is_empty() {
                    detail = stderr.trim().to_string();
                }
                if detail.is_empty() {
                    detail = format!("exit status {status}");
                }
                Err(RtError::Failed(format!("runc {} failed: {detail}", args[0])))
            }
            Err(CmdError::Io(e)) => Err(RtError::Failed(format!("runc {} failed: {e}", args[0]))),
        }
    }

    fn init_flags<'a>(&self, console: &'a str, args: &mut Vec<&'a str>) {
        if !console.is_empty() {
            args.push("--console-socket");
            args.push(console);
        }
        if self.opts.no_pivot_root {
            args.push("--no-pivot");
        }
        if self.opts.no_new_keyring {
            args.push("--no-new-keyring");
        }
    }
}

/// The last `max` bytes of a file (a log); None when it cannot be read.
fn read_tail(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let end = f.seek(SeekFrom::End(0)).ok()?;
    f.seek(SeekFrom::Start(end.saturating_sub(max))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    Some(buf)
}

pub fn last_error_in(log_path: &str) -> String {
    let Some(buf) = read_tail(Path::new(log_path), 8192) else { return String::new() };
    for line in buf.split(|b| *b == b'\n').rev() {
        if let Ok(rec) = serde_json::from_slice::<serde_json::Value>(line) {
            let level = rec.get("level").and_then(|v| v.as_str()).unwrap_or("");
            if level == "error" || level == "fatal" {
                return rec
                    .get("msg")
                    .map(|m| m.as_str().map(str::to_string).unwrap_or_else(|| m.to_string()))
                    .unwrap_or_default();
            }
        }
    }
    String::new()
}

pub async fn read_pid_file(path: &str) -> RtResult<i32> {
    let text = std::fs::read_to_string(path).map_err(|e| RtError::Failed(format!("pid file {path}: {e}")))?;
    text.trim().parse().map_err(|_| RtError::Failed(format!("pid file {path}: not a pid: {:?}", text.trim())))
}

/// The last few `Error (...)` lines of a CRIU log: runc itself only says "criu failed".
pub fn criu_errors(text: &str, limit: usize) -> String {
    let lines: Vec<&str> = text.lines().filter_map(|l| l.find("Error").map(|i| l[i..].trim())).collect();
    lines[lines.len().saturating_sub(limit)..].join("; ")
}

fn with_criu_log(message: String, log_path: &Path) -> String {
    let found =
        read_tail(log_path, 65536).map(|buf| criu_errors(&String::from_utf8_lossy(&buf), 3)).unwrap_or_default();
    if found.is_empty() {
        return message;
    }
    let name = log_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{message}; {name}: {found}")
}

#[async_trait]
impl Runtime for Runc {
    fn label(&self) -> String {
        self.opts.binary.clone()
    }

    fn watch_exit(&self, pid: i32) -> oneshot::Receiver<Exit> {
        self.reaper.watch(pid)
    }

    async fn create(&self, cid: &str, bundle: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()> {
        let mut args = vec!["create", "--bundle", bundle, "--pid-file", pid_file];
        self.init_flags(console, &mut args);
        args.push(cid);
        self.run(&args, None, Some(stdio), self.timeout).await.map(|_| ())
    }

    async fn run_detached(&self, cid: &str, bundle: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()> {
        let mut args = vec!["run", "--detach", "--bundle", bundle, "--pid-file", pid_file];
        self.init_flags(console, &mut args);
        args.push(cid);
        self.run(&args, None, Some(stdio), self.timeout).await.map(|_| ())
    }

    async fn started_pid(&self, pid_file: &str) -> RtResult<i32> {
        read_pid_file(pid_file).await
    }

    async fn start(&self, cid: &str) -> RtResult<()> {
        self.run(&["start", cid], None, None, self.timeout).await.map(|_| ())
    }

    async fn exec(&self, cid: &str, process_file: &str, pid_file: &str, stdio: Stdio, console: &str) -> RtResult<()> {
        let mut args = vec!["exec", "--detach", "--process", process_file, "--pid-file", pid_file];
        if !console.is_empty() {
            args.push("--console-socket");
            args.push(console);
        }
        args.push(cid);
        self.run(&args, None, Some(stdio), self.timeout).await.map(|_| ())
    }

    async fn kill(&self, cid: &str, sig: i32, all: bool) -> RtResult<()> {
        let sig = sig.to_string();
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.push(cid);
        args.push(&sig);
        self.run(&args, None, None, self.timeout).await.map(|_| ())
    }

    async fn kill_all(&self, cid: &str, sig: i32) -> RtResult<String> {
        let (root, id) = (self.opts.root.clone(), cid.to_string());
        let why = tokio::task::spawn_blocking(move || cgroup_kill::signal_all(&root, &id, sig))
            .await
            .unwrap_or_else(|e| format!("cgroup kill: {e}"));
        if !why.is_empty() {
            self.kill(cid, sig, true).await?;
        }
        Ok(why)
    }

    async fn delete(&self, cid: &str, force: bool) -> RtResult<()> {
        let mut args = vec!["delete"];
        if force {
            args.push("--force");
        }
        args.push(cid);
        self.run(&args, None, None, self.timeout).await.map(|_| ())
    }

    async fn delete_reaped(&self, cid: &str, own_pid_ns: bool) -> RtResult<String> {
        let (root, id) = (self.opts.root.clone(), cid.to_string());
        let why = tokio::task::spawn_blocking(move || reaped_delete::remove(&root, &id, own_pid_ns))
            .await
            .unwrap_or_else(|e| format!("reaped delete: {e}"));
        if !why.is_empty() {
            self.delete(cid, true).await?;
        }
        Ok(why)
    }

    async fn pause(&self, cid: &str) -> RtResult<()> {
        self.run(&["pause", cid], None, None, self.timeout).await.map(|_| ())
    }

    async fn resume(&self, cid: &str) -> RtResult<()> {
        self.run(&["resume", cid], None, None, self.timeout).await.map(|_| ())
    }

    async fn update(&self, cid: &str, resources_json: Vec<u8>) -> RtResult<()> {
        self.run(&["update", "--resources", "-", cid], Some(resources_json), None, self.timeout).await.map(|_| ())
    }

    async fn ps(&self, cid: &str) -> RtResult<Vec<i32>> {
        let out = self.run(&["ps", "--format", "json", cid], None, None, self.timeout).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| RtError::Failed(format!("runc ps: bad output: {e}")))?;
        Ok(v.as_array().map(|a| a.iter().filter_map(|p| p.as_i64()).map(|p| p as i32).collect()).unwrap_or_default())
    }

    async fn checkpoint(
        &self,
        cid: &str,
        image_path: &str,
        work_path: &str,
        leave_running: bool,
        file_locks: bool,
    ) -> RtResult<()> {
        let mut args = vec!["checkpoint", "--image-path", image_path, "--work-path", work_path];
        if leave_running {
            args.push("--leave-running");
        }
        if file_locks {
            args.push("--file-locks");
        }
        args.push(cid);
        match self.run(&args, None, None, self.timeout.max(CRIU_TIMEOUT)).await {
            Err(RtError::Failed(m)) => Err(RtError::Failed(with_criu_log(m, &Path::new(work_path).join("dump.log")))),
            other => other.map(|_| ()),
        }
    }

    async fn restore(
        &self,
        cid: &str,
        bundle: &str,
        image_path: &str,
        work_path: &str,
        pid_file: &str,
        stdio: Stdio,
        console: &str,
    ) -> RtResult<()> {
        let mut args = vec![
            "restore",
            "--detach",
            "--bundle",
            bundle,
            "--image-path",
            image_path,
            "--work-path",
            work_path,
            "--pid-file",
            pid_file,
        ];
        self.init_flags(console, &mut args);
        args.push(cid);
        match self.run(&args, None, Some(stdio), self.timeout.max(CRIU_TIMEOUT)).await {
            Err(RtError::Failed(m)) => {
                Err(RtError::Failed(with_criu_log(m, &Path::new(work_path).join("restore.log"))))
            }
            other => other.map(|_| ()),
        }
    }
}
