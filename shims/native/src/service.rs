//! The containerd.task.v2.Task service of the shim, plus shimd.shim.v1.Logs.
//!
//! Semantics follow containerd's runc shim, as the Python shim (shims/runc/service.py) does: a task is a
//! runc container (its init) plus exec processes; exit statuses stay in memory until Delete; unknown ids
//! answer NOT_FOUND and calls in the wrong state FAILED_PRECONDITION.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim_protos::api::{self, Empty};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{CodedInputStream, CodedOutputStream, Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::{MethodHandler, Service, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, get_status, Code};
use containerd_shim_protos::types::task::Status;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::log::Logger;
use crate::mounts::{self, Mount};
use crate::reaper::{self, Exit, Reaper};
use crate::runtime::{criu_errors, RtError, Runc, RuncOptions, Runtime};
use crate::stdio::{AttachFanout, ProcessIo};
use crate::writer::FileWriter;
use crate::{cgroup_lock, paths, pause, reaped_delete, runc_state};

pub const VERSION: &str = "shimd-runc-shim/1";
const SIGKILL: i32 = 9;
const IO_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Opening a log file waits behind the writes queued before it (bounded by the writer's high-water mark).
const LOG_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
const CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
const START_ON_CREATE_ANNOTATION: &str = "io.shimd.start-on-create";
const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

type TResult<T> = ttrpc::Result<T>;

fn status_error(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(code, msg.into()))
}

fn not_found(msg: impl Into<String>) -> ttrpc::Error {
    status_error(Code::NOT_FOUND, msg)
}

fn precondition(msg: impl Into<String>) -> ttrpc::Error {
    status_error(Code::FAILED_PRECONDITION, msg)
}

/// runc's (and runsc's) ways of saying the container's process is no longer there.
fn gone(runc_error: &str) -> bool {
    let text = runc_error.to_lowercase();
    ["not running", "no such process", "process already finished"].iter().any(|m| text.contains(m))
}

fn timestamp(ns: u64) -> MessageField<Timestamp> {
    if ns == 0 {
        return MessageField::none();
    }
    let mut ts = Timestamp::new();
    ts.seconds = (ns / 1_000_000_000) as i64;
    ts.nanos = (ns % 1_000_000_000) as i32;
    MessageField::some(ts)
}

pub fn runtime_timeout() -> Duration {
    // Read when used: the environment is the shim's own, set by its launcher.
    let secs = std::env::var("SHIMD_RUNTIME_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(60.0);
    Duration::from_secs_f64(secs.max(0.001))
}

struct ProcState {
    pid: i32,
    status: Status,
    exit_status: u32,
    exited_at: u64,
}

/// A container's init (exec_id "") or one exec process.
pub struct Proc {
    cid: String,
    exec_id: String,
    io: ProcessIo,
    terminal: bool,
    spec: Vec<u8>,
    st: Mutex<ProcState>,
    exited: watch::Sender<bool>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proc {
    fn new(cid: &str, exec_id: &str, io: ProcessIo, terminal: bool, spec: Vec<u8>) -> Arc<Proc> {
        Arc::new(Proc {
            cid: cid.into(),
            exec_id: exec_id.into(),
            io,
            terminal,
            spec,
            st: Mutex::new(ProcState { pid: 0, status: Status::CREATED, exit_status: 0, exited_at: 0 }),
            exited: watch::channel(false).0,
            watcher: Mutex::new(None),
        })
    }

    fn name(&self) -> String {
        if self.exec_id.is_empty() {
            format!("container {:?}", self.cid)
        } else {
            format!("exec {:?} of container {:?}", self.exec_id, self.cid)
        }
    }

    fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    async fn wait_exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    fn pid(&self) -> i32 {
        self.st.lock().unwrap().pid
    }

    fn status(&self) -> Status {
        self.st.lock().unwrap().status
    }

    fn set_running_unless_exited(&self) {
        let mut st = self.st.lock().unwrap();
        if !self.has_exited() {
            st.status = Status::RUNNING;
        }
    }

    fn exit_info(&self) -> (i32, u32, u64) {
        let st = self.st.lock().unwrap();
        (st.pid, st.exit_status, st.exited_at)
    }
}

#[derive(Default)]
struct Flags {
    paused: bool,
    /// CRIU image directory of a container created from a checkpoint: Start restores from it.
    restore_from: String,
    /// Made running by Create (`runc run --detach`, the spec asked for it): its Start only answers.
    started_by_create: bool,
    rootfs_mounted: bool,
}

pub struct Container {
    id: String,
    bundle: String,
    runtime: Arc<dyn Runtime>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    flags: Mutex<Flags>,
    /// The init is pid 1 of a PID namespace of its own: a SIGKILL to it is all of `runc kill --all`.
    own_pid_ns: bool,
    /// Once its init is reaped, Delete may do without runc (reaped_delete.rs).
    delete_reaped: bool,
    /// A signal to all its processes may do without runc (cgroup_kill.rs).
    kill_all_itself: bool,
    lock: tokio::sync::Mutex<()>,
}

impl Container {
    fn paused(&self) -> bool {
        self.flags.lock().unwrap().paused
    }
}

/// How a process is made by the runtime, once its stdio (and console socket) exist.
enum Launch<'a> {
    Create { early: bool },
    Exec { spec_file: &'a str },
    Restore { image_path: &'a str, work_path: &'a str },
}

pub struct TaskService {
    namespace: String,
    pod_id: String,
    socket_dir: String,
    reaper: Reaper,
    writer: FileWriter,
    log: Logger,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    console_seq: AtomicU64,
    criu_checked: AtomicBool,
    shutdown: Arc<Notify>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        pod_id: &str,
        socket_dir: &str,
        reaper: Reaper,
        writer: FileWriter,
        log: Logger,
        shutdown: Arc<Notify>,
    ) -> Arc<TaskService> {
        Arc::new(TaskService {
            namespace: namespace.into(),
            pod_id: pod_id.into(),
            socket_dir: socket_dir.into(),
            reaper,
            writer,
            log,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            console_seq: AtomicU64::new(0),
            criu_checked: AtomicBool::new(false),
            shutdown,
        })
    }

    pub fn services(self: &Arc<Self>) -> HashMap<String, Service> {
        let task: Box<dyn Task + Send + Sync> = Box::new(TaskApi(self.clone()));
        let mut services = containerd_shim_protos::shim_async::create_task(Arc::new(task));
        let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
        methods.insert("Reopen".into(), Box::new(ReopenMethod(self.clone())));
        services.insert("shimd.shim.v1.Logs".into(), Service { methods, streams: HashMap::new() });
        services
    }

    fn fail(&self, method: &str, id: &str, e: RtError) -> ttrpc::Error {
        self.log.error("call failed", &[("method", json!(method)), ("id", json!(id)), ("error", json!(e.to_string()))]);
        let code = if matches!(e, RtError::TimedOut(_)) { Code::DEADLINE_EXCEEDED } else { Code::UNKNOWN };
        status_error(code, e.to_string())
    }

    fn io_fail(&self, method: &str, id: &str, e: std::io::Error) -> ttrpc::Error {
        self.fail(method, id, RtError::Failed(e.to_string()))
    }

    fn container(&self, cid: &str) -> TResult<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(cid)
            .cloned()
            .ok_or_else(|| not_found(format!("container {cid:?} not found in shim of pod {:?}", self.pod_id)))
    }

    fn proc(&self, c: &Container, exec_id: &str) -> TResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id:?} not found in container {:?}", c.id)))
    }

    /// Where shimd's Attach reads the output of a container (not of the pod's pause task).
    fn attach_fanout(&self, cid: &str, log: &Logger) -> Option<AttachFanout> {
        if cid == self.pod_id {
            return None;
        }
        match AttachFanout::new(&paths::attach_socket_path(&self.socket_dir, cid)) {
            Ok(a) => Some(a),
            Err(e) => {
                log.error("cannot serve attach", &[("error", json!(e.to_string()))]);
                None
            }
        }
    }

    fn watch(self: &Arc<Self>, proc: &Arc<Proc>, exit: tokio::sync::oneshot::Receiver<Exit>) {
        let p = proc.clone();
        let log = self.log.clone();
        let handle = tokio::spawn(async move {
            let Ok(exit) = exit.await else { return };
            // Output written just before the exit must reach the log before anyone learns of the exit.
            p.io.drain(IO_DRAIN_TIMEOUT).await;
            let pid = {
                let mut st = p.st.lock().unwrap();
                st.status = Status::STOPPED;
                st.exit_status = exit.status;
                st.exited_at = exit.at_ns;
                st.pid
            };
            p.exited.send_replace(true);
            log.info(
                "process exited",
                &[
                    ("container_id", json!(p.cid)),
                    ("exec_id", json!(p.exec_id)),
                    ("pid", json!(pid)),
                    ("exit_status", json!(exit.status)),
                ],
            );
        });
        *proc.watcher.lock().unwrap() = Some(handle);
    }

    /// Runs runc create/exec/restore with the process's stdio (and console socket); returns the new pid.
    async fn spawn_with_io(
        self: &Arc<Self>,
        proc: &Arc<Proc>,
        rt: &Arc<dyn Runtime>,
        bundle: &str,
        launch: Launch<'_>,
        pid_file: &str,
    ) -> Result<i32, RtError> {
        let io_err = |e: std::io::Error| RtError::Failed(e.to_string());
        proc.io.prepare().map_err(io_err)?;
        let result = async {
            proc.io.open_logs(LOG_OPEN_TIMEOUT).await.map_err(io_err)?;
            let mut console: Option<(tokio::task::JoinHandle<std::io::Result<OwnedFd>>, String)> = None;
            if proc.terminal {
                let seq = self.console_seq.fetch_add(1, Ordering::Relaxed) + 1;
                let path = format!("{}/c-{}-{seq}.sock", self.socket_dir, std::process::id());
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path).map_err(io_err)?;
                console = Some((tokio::spawn(receive_console(listener)), path));
            }
            let console_path = console.as_ref().map(|(_, p)| p.clone()).unwrap_or_default();
            let stdio = proc.io.stdio();
            let ran = match launch {
                Launch::Create { early: true } => {
                    rt.run_detached(&proc.cid, bundle, pid_file, stdio, &console_path).await
                }
                Launch::Create { early: false } => rt.create(&proc.cid, bundle, pid_file, stdio, &console_path).await,
                Launch::Exec { spec_file } => rt.exec(&proc.cid, spec_file, pid_file, stdio, &console_path).await,
                Launch::Restore { image_path, work_path } => {
                    rt.restore(&proc.cid, bundle, image_path, work_path, pid_file, stdio, &console_path).await
                }
            };
            let mut pty = None;
            if let Some((task, path)) = console {
                let got = if ran.is_ok() {
                    match tokio::time::timeout(CONSOLE_TIMEOUT, task).await {
                        Ok(Ok(Ok(fd))) => Ok(Some(fd)),
                        Ok(Ok(Err(e))) => Err(io_err(e)),
                        Ok(Err(e)) => Err(RtError::Failed(format!("console: {e}"))),
                        Err(_) => Err(RtError::Failed("runc sent no terminal on the console socket in time".into())),
                    }
                } else {
                    task.abort();
                    Ok(None)
                };
                let _ = std::fs::remove_file(&path);
                pty = got?;
            }
            ran?;
            let pid = rt.started_pid(pid_file).await?;
            Ok::<_, RtError>((pid, pty))
        }
        .await;
        let (pid, pty) = match result {
            Ok(v) => v,
            Err(e) => {
                proc.io.close();
                return Err(e);
            }
        };
        proc.st.lock().unwrap().pid = pid;
        let exit = rt.watch_exit(pid);
        proc.io.start_copies(pty);
        self.watch(proc, exit);
        Ok(pid)
    }

    async fn check_checkpoint_support(&self, rt: &Arc<dyn Runtime>, what: &str) -> TResult<()> {
        let unsupported = rt.checkpoint_unsupported();
        if !unsupported.is_empty() {
            return Err(precondition(unsupported));
        }
        if self.criu_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let path = std::env::var("PATH").unwrap_or_else(|_| "/bin:/usr/bin".into());
        let Some(criu) = find_executable("criu", &path) else {
            return Err(precondition(format!(
                "{what} needs CRIU: the criu binary is not installed (not found in PATH {path:?}); install the criu package"
            )));
        };
        match reaper::run(&self.reaper, &[criu.clone(), "check".into()], runtime_timeout(), None, None).await {
            Ok(out) => {
                // Only success is kept: criu may be installed or fixed later.
                self.criu_checked.store(true, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat())
                    .trim()
                    .chars()
                    .take(200)
                    .collect::<String>();
                self.log.info("criu check passed", &[("criu", json!(criu)), ("output", json!(text))]);
                Ok(())
            }
            Err(reaper::CmdError::Failed { status, stderr, .. }) => {
                let mut detail = criu_errors(&stderr, 3);
                if detail.is_empty() {
                    let t = stderr.trim();
                    detail = t[t.len().saturating_sub(500)..].to_string();
                }
                if detail.is_empty() {
                    detail = format!("exit status {status}");
                }
                Err(precondition(format!("{what} needs CRIU, and `criu check` fails on this host: {detail}")))
            }
            Err(e) => Err(precondition(format!("{what} needs CRIU, and `criu check` fails on this host: {e}"))),
        }
    }

    // -- Task service ------------------------------------------------------------------------------
    async fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> TResult<api::CreateTaskResponse> {
        let (cid, bundle) = (req.id.clone(), req.bundle.clone());
        if cid.is_empty() {
            return Err(status_error(Code::INVALID_ARGUMENT, "id must not be empty"));
        }
        {
            let creating = self.creating.lock().unwrap();
            if self.containers.lock().unwrap().contains_key(&cid) || creating.contains(&cid) {
                return Err(status_error(Code::ALREADY_EXISTS, format!("container {cid:?} already exists")));
            }
        }
        let t0 = Instant::now();
        let facts = if !bundle.is_empty() && Path::new(&bundle).is_absolute() { spec_facts(&bundle) } else { None };
        let Some((own_pid_ns, start_on_create, spec)) = facts else {
            return Err(status_error(Code::INVALID_ARGUMENT, format!("bundle {bundle:?} has no readable config.json")));
        };
        let opts = runc_options(req.options.as_ref(), &self.namespace)?;
        let log = self.log.bind("container_id", cid.clone());
        let restore_from = req.checkpoint.clone();
        let log_json = format!("{bundle}/log.json");
        let mut rt: Option<Arc<dyn Runtime>> = None;
        if is_sandbox(&spec) && start_on_create && restore_from.is_empty() && !req.terminal {
            if let Some(plan) = pause::plan(&spec, &bundle, &opts) {
                rt = Some(Arc::new(pause::PauseRuntime::new(
                    self.reaper.clone(),
                    opts.clone(),
                    log_json.clone(),
                    runtime_timeout(),
                    plan,
                    log.clone(),
                )));
            }
        }
        let rt: Arc<dyn Runtime> = rt.unwrap_or_else(|| {
            Arc::new(Runc::new(self.reaper.clone(), opts.clone(), log_json.clone(), runtime_timeout()))
        });
        if !restore_from.is_empty() {
            self.check_checkpoint_support(&rt, "restore").await?;
            if !Path::new(&restore_from).is_absolute() || !Path::new(&restore_from).is_dir() {
                return Err(status_error(
                    Code::INVALID_ARGUMENT,
                    format!("checkpoint {restore_from:?} is not a directory of CRIU images"),
                ));
            }
        }
        self.creating.lock().unwrap().insert(cid.clone());
        let rootfs = format!("{bundle}/rootfs");
        // runc moves the init into its cgroups: the kernel lock that takes is taken now (cgroup_lock.rs).
        let warming = (rt.caps().moves_into_cgroups && restore_from.is_empty())
            .then(|| tokio::task::spawn_blocking(cgroup_lock::take));
        let mut mounted = false;
        let result = async {
            let mut steps: Vec<(&str, f64)> = vec![("spec", t0.elapsed().as_secs_f64())];
            if rt.caps().binary_keeps_state {
                // containerd's runc shim keeps its options here too; `shim delete` reads them after a crash.
                let opts_json = json!({"binary_name": opts.binary, "root": opts.root,
                    "systemd_cgroup": opts.systemd_cgroup});
                write_atomic(&format!("{bundle}/options.json"), opts_json.to_string().as_bytes(), false)
                    .map_err(|e| self.io_fail("create", &cid, e))?;
            }
            if !req.rootfs.is_empty() {
                let list: Vec<Mount> = req
                    .rootfs
                    .iter()
                    .map(|m| Mount {
                        kind: m.type_.clone(),
                        source: m.source.clone(),
                        target: m.target.clone(),
                        options: m.options.clone(),
                    })
                    .collect();
                mounts::mount_all(&self.reaper, &list, &rootfs, runtime_timeout()).await.map_err(|e| {
                    let e = if e.kind() == std::io::ErrorKind::TimedOut {
                        RtError::TimedOut(e.to_string())
                    } else {
                        RtError::Failed(e.to_string())
                    };
                    self.fail("create", &cid, e)
                })?;
                mounted = true;
            }
            steps.push(("mount", t0.elapsed().as_secs_f64() - steps.iter().map(|s| s.1).sum::<f64>()));
            let io = ProcessIo::new(
                self.writer.clone(),
                &req.stdin,
                &req.stdout,
                &req.stderr,
                req.terminal,
                self.attach_fanout(&cid, &log),
            );
            let init = Proc::new(&cid, "", io, req.terminal, Vec::new());
            let pid_file = format!("{bundle}/init.pid");
            if !restore_from.is_empty() {
                // As containerd's shim does: nothing runs until Start, which is `runc restore`.
                let c = Arc::new(Container {
                    id: cid.clone(),
                    bundle: bundle.clone(),
                    runtime: rt.clone(),
                    init,
                    execs: Mutex::new(HashMap::new()),
                    flags: Mutex::new(Flags {
                        restore_from: restore_from.clone(),
                        rootfs_mounted: mounted,
                        ..Default::default()
                    }),
                    own_pid_ns,
                    delete_reaped: false,
                    kill_all_itself: false,
                    lock: tokio::sync::Mutex::new(()),
                });
                self.containers.lock().unwrap().insert(cid.clone(), c);
                mounted = false;
                log.info("created from checkpoint", &[("checkpoint", json!(restore_from)), ("bundle", json!(bundle))]);
                return Ok(0);
            }
            // shimd starts this task right after making it: one runc process does both.
            let early = start_on_create && rt.caps().runs_detached && !req.terminal;
            let pid = match self.spawn_with_io(&init, &rt, &bundle, Launch::Create { early }, &pid_file).await {
                Ok(pid) => pid,
                Err(e) => {
                    // Undo a half-made container, but never one that already existed under this id.
                    if !e.to_string().contains("exists") {
                        let _ = rt.delete(&cid, true).await;
                    }
                    return Err(self.fail("create", &cid, e));
                }
            };
            steps.push(("runc", t0.elapsed().as_secs_f64() - steps.iter().map(|s| s.1).sum::<f64>()));
            let c = Arc::new(Container {
                id: cid.clone(),
                bundle: bundle.clone(),
                runtime: rt.clone(),
                init: init.clone(),
                execs: Mutex::new(HashMap::new()),
                flags: Mutex::new(Flags { started_by_create: early, rootfs_mounted: mounted, ..Default::default() }),
                own_pid_ns,
                delete_reaped: rt.caps().deletes_reaped_itself
                    && reaped_delete::spec_allows(&spec, &opts.binary, opts.systemd_cgroup),
                kill_all_itself: rt.caps().signals_cgroup_itself
                    && runc_state::plain_runc(&opts.binary, opts.systemd_cgroup),
                lock: tokio::sync::Mutex::new(()),
            });
            if early {
                init.set_running_unless_exited();
            }
            self.containers.lock().unwrap().insert(cid.clone(), c);
            mounted = false;
            let ms: serde_json::Map<String, Value> =
                steps.iter().map(|(k, v)| (k.to_string(), json!((v * 100000.0).round() / 100.0))).collect();
            log.info(
                "created",
                &[
                    ("pid", json!(pid)),
                    ("bundle", json!(bundle)),
                    ("runtime", json!(rt.label())),
                    ("ms", Value::Object(ms)),
                ],
            );
            Ok(pid)
        }
        .await;
        self.creating.lock().unwrap().remove(&cid);
        if mounted {
            let _ = mounts::unmount(&rootfs);
        }
        if let Some(w) = warming {
            let _ = w.await; // a thread's write, bounded by one grace period
        }
        let pid = result?;
        Ok(api::CreateTaskResponse { pid: pid as u32, ..Default::default() })
    }

    async fn start(self: &Arc<Self>, req: api::StartRequest) -> TResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let proc = self.proc(&c, &req.exec_id)?;
        let _guard = c.lock.lock().await;
        let resp = |pid: i32| Ok(api::StartResponse { pid: pid as u32, ..Default::default() });
        if proc.exec_id.is_empty() {
            let mut flags = c.flags.lock().unwrap();
            if flags.started_by_create {
                flags.started_by_create = false; // once: a second Start is refused as for any started task
                return resp(proc.pid());
            }
        }
        if proc.status() != Status::CREATED || (!proc.exec_id.is_empty() && proc.pid() != 0) {
            return Err(precondition(format!("{} cannot be started: it is not in the created state", proc.name())));
        }
        let restore_from = c.flags.lock().unwrap().restore_from.clone();
        if proc.exec_id.is_empty() && !restore_from.is_empty() {
            return self.restore(&c, &restore_from).await.and_then(resp);
        }
        if proc.exec_id.is_empty() {
            c.runtime.start(&c.id).await.map_err(|e| self.fail("start", &c.id, e))?;
            proc.set_running_unless_exited();
            return resp(proc.pid());
        }
        if c.init.status() != Status::RUNNING {
            return Err(precondition(format!(
                "container {:?} is not running, cannot start exec {:?}",
                c.id, proc.exec_id
            )));
        }
        let spec_file = format!("{}/exec-{}.json", c.bundle, proc.exec_id);
        let pid_file = format!("{}/exec-{}.pid", c.bundle, proc.exec_id);
        write_atomic(&spec_file, &proc.spec, false).map_err(|e| self.io_fail("start", &c.id, e))?;
        let result =
            self.spawn_with_io(&proc, &c.runtime, &c.bundle, Launch::Exec { spec_file: &spec_file }, &pid_file).await;
        let _ = std::fs::remove_file(&spec_file);
        let _ = std::fs::remove_file(&pid_file);
        let pid = result.map_err(|e| self.fail("start", &c.id, e))?;
        proc.set_running_unless_exited();
        self.log.info(
            "exec started",
            &[("container_id", json!(c.id)), ("exec_id", json!(proc.exec_id)), ("pid", json!(pid))],
        );
        resp(pid)
    }

    /// Start of a container created from a checkpoint: `runc restore` with the new stdio.
    async fn restore(self: &Arc<Self>, c: &Arc<Container>, image_path: &str) -> TResult<i32> {
        let proc = c.init.clone();
        let pid_file = format!("{}/init.pid", c.bundle);
        let work_path = format!("{}/criu-work", c.bundle);
        make_dirs(&[&work_path]).map_err(|e| self.io_fail("start", &c.id, e))?;
        let result = self
            .spawn_with_io(
                &proc,
                &c.runtime,
                &c.bundle,
                Launch::Restore { image_path, work_path: &work_path },
                &pid_file,
            )
            .await;
        c.flags.lock().unwrap().restore_from.clear();
        match result {
            Ok(pid) => {
                proc.set_running_unless_exited();
                self.log.info("restored", &[("container_id", json!(c.id)), ("pid", json!(pid))]);
                Ok(pid)
            }
            Err(e) => {
                // runc restore may leave a half-made container behind; Delete must remove it.
                let _ = c.runtime.delete(&c.id, true).await;
                Err(self.fail("start", &c.id, e))
            }
        }
    }

    async fn state(&self, req: api::StateRequest) -> TResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        let st = p.st.lock().unwrap();
        let status =
            if p.exec_id.is_empty() && c.paused() && st.status == Status::RUNNING { Status::PAUSED } else { st.status };
        let (stdin, stdout, stderr) = p.io.uris();
        Ok(api::StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.clone(),
            pid: st.pid as u32,
            status: status.into(),
            stdin,
            stdout,
            stderr,
            terminal: p.terminal,
            exit_status: st.exit_status,
            exited_at: timestamp(st.exited_at),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn kill(&self, req: api::KillRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        let sig = req.signal as i32;
        if p.has_exited() {
            return Err(not_found(format!("{}: process already finished", p.name())));
        }
        if p.exec_id.is_empty() && self.signal_init(&c, sig, req.all) {
            return Ok(Empty::new());
        }
        if p.exec_id.is_empty() {
            let result = if req.all && c.kill_all_itself && !c.paused() {
                c.runtime.kill_all(&c.id, sig).await.map(|why| {
                    if !why.is_empty() {
                        self.log.info(
                            "runc signalled all its processes",
                            &[("container_id", json!(c.id)), ("reason", json!(why))],
                        );
                    }
                })
            } else {
                c.runtime.kill(&c.id, sig, req.all).await
            };
            if let Err(e) = result {
                // The init exited between our check and runc's: as containerd's shim does, that is
                // "already finished", not a failure.
                if p.has_exited() || gone(&e.to_string()) {
                    return Err(not_found(format!("{}: process already finished", p.name())));
                }
                return Err(self.fail("kill", &c.id, e));
            }
        } else if p.pid() == 0 {
            return Err(precondition(format!("{} has not been started", p.name())));
        } else {
            // SAFETY: kill(2) of the exec's pid, held unreaped until its watcher saw it exit.
            if unsafe { libc::kill(p.pid(), sig) } != 0 {
                return Err(not_found(format!("{}: process already finished", p.name())));
            }
        }
        Ok(Empty::new())
    }

    /// The init signalled with kill(2), saving a runc process on every stop; false: runc must do it.
    /// Safe from pid reuse: the init is our unreaped child while the reaper holds it.
    fn signal_init(&self, c: &Container, sig: i32, all: bool) -> bool {
        let pid = c.init.pid();
        if !(c.runtime.caps().signals_directly && pid != 0 && !c.paused() && self.reaper.holds(pid)) {
            return false;
        }
        if all && !(c.own_pid_ns && sig == SIGKILL) {
            return false;
        }
        // SAFETY: see above.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    async fn delete(&self, req: api::DeleteRequest) -> TResult<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        let _guard = c.lock.lock().await;
        let resp = |p: &Proc| {
            let (pid, status, at) = p.exit_info();
            Ok(api::DeleteResponse {
                pid: pid as u32,
                exit_status: status,
                exited_at: timestamp(at),
                ..Default::default()
            })
        };
        if !p.exec_id.is_empty() {
            if p.pid() != 0 && !p.has_exited() {
                return Err(precondition(format!("{} is still running; kill it and wait before deleting", p.name())));
            }
            c.execs.lock().unwrap().remove(&p.exec_id);
            p.io.close();
            return resp(&p);
        }
        if p.status() == Status::RUNNING && !p.has_exited() {
            return Err(precondition(format!("{} is running; it must be stopped before it is deleted", p.name())));
        }
        let restoring = !c.flags.lock().unwrap().restore_from.is_empty();
        if restoring {
            // a never-restored container has nothing in runc to delete
        } else if c.delete_reaped && p.pid() != 0 && p.has_exited() {
            let why = c.runtime.delete_reaped(&c.id, c.own_pid_ns).await.map_err(|e| self.fail("delete", &c.id, e))?;
            if !why.is_empty() {
                self.log.info("runc deleted it", &[("container_id", json!(c.id)), ("reason", json!(why))]);
            }
        } else {
            c.runtime.delete(&c.id, true).await.map_err(|e| self.fail("delete", &c.id, e))?;
        }
        if p.pid() != 0 && !p.has_exited() {
            // A created (never started) init is killed by runc delete; collect its status.
            let _ = tokio::time::timeout(Duration::from_secs(5), p.wait_exited()).await;
        }
        for e in c.execs.lock().unwrap().values() {
            e.io.close();
        }
        p.io.close();
        let mounted = c.flags.lock().unwrap().rootfs_mounted;
        if mounted {
            // An overlay's unmount takes milliseconds: off the loop, as the shim's other calls go on.
            let rootfs = format!("{}/rootfs", c.bundle);
            let done = tokio::task::spawn_blocking(move || mounts::unmount(&rootfs))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            if let Err(e) = done {
                return Err(self.io_fail("delete", &c.id, e));
            }
        }
        c.runtime.close();
        self.containers.lock().unwrap().remove(&c.id);
        self.log.info("deleted", &[("container_id", json!(c.id)), ("exit_status", json!(p.exit_info().1))]);
        tokio::spawn(async {
            // Hand freed heap back to the kernel.
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        });
        resp(&p)
    }

    async fn exec(&self, req: api::ExecProcessRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let exec_id = req.exec_id.clone();
        if exec_id.is_empty() || exec_id.contains('/') || exec_id.starts_with('.') || exec_id.chars().count() > 128 {
            return Err(status_error(
                Code::INVALID_ARGUMENT,
                format!("exec_id {exec_id:?} must be 1-128 characters, without '/' or a leading '.'"),
            ));
        }
        if c.execs.lock().unwrap().contains_key(&exec_id) {
            return Err(status_error(
                Code::ALREADY_EXISTS,
                format!("exec {exec_id:?} already exists in container {:?}", c.id),
            ));
        }
        if c.init.has_exited() {
            return Err(precondition(format!("container {:?} has exited; cannot exec in it", c.id)));
        }
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        if spec.is_empty() {
            return Err(status_error(Code::INVALID_ARGUMENT, "spec: an OCI process is required"));
        }
        if let Err(e) = serde_json::from_slice::<Value>(&spec) {
            return Err(status_error(Code::INVALID_ARGUMENT, format!("spec: not a JSON OCI process: {e}")));
        }
        let io = ProcessIo::new(self.writer.clone(), &req.stdin, &req.stdout, &req.stderr, req.terminal, None);
        let proc = Proc::new(&c.id, &exec_id, io, req.terminal, spec);
        c.execs.lock().unwrap().insert(exec_id, proc);
        Ok(Empty::new())
    }

    async fn resize_pty(&self, req: api::ResizePtyRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        let Some(fd) = p.io.console() else {
            return Err(precondition(format!("{} has no terminal", p.name())));
        };
        let ws = libc::winsize { ws_row: req.height as u16, ws_col: req.width as u16, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from our struct.
        if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(self.io_fail("resize_pty", &c.id, std::io::Error::last_os_error()));
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, req: api::CloseIORequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        if req.stdin {
            p.io.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(&self, req: api::UpdateTaskRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let res = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        if res.is_empty() {
            return Err(status_error(Code::INVALID_ARGUMENT, "resources: OCI LinuxResources JSON is required"));
        }
        let exited = || precondition(format!("container {:?} has exited; cannot update it", c.id));
        if c.init.has_exited() {
            return Err(exited());
        }
        if let Err(e) = c.runtime.update(&c.id, res).await {
            if c.init.has_exited() || gone(&e.to_string()) {
                return Err(exited());
            }
            return Err(self.fail("update", &c.id, e));
        }
        Ok(Empty::new())
    }

    async fn pids(&self, req: api::PidsRequest) -> TResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c.runtime.ps(&c.id).await.map_err(|e| self.fail("pids", &c.id, e))?;
        let by_pid: HashMap<i32, String> =
            c.execs.lock().unwrap().values().filter(|e| e.pid() != 0).map(|e| (e.pid(), e.exec_id.clone())).collect();
        let mut out = api::PidsResponse::new();
        for pid in pids {
            let mut info = containerd_shim_protos::types::task::ProcessInfo::new();
            info.pid = pid as u32;
            if let Some(exec_id) = by_pid.get(&pid) {
                let mut any = Any::new();
                any.type_url = "containerd.runc.v1.ProcessDetails".into();
                any.value = encode_string_field(1, exec_id);
                info.info = MessageField::some(any);
            }
            out.processes.push(info);
        }
        Ok(out)
    }

    async fn pause(&self, req: api::PauseRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        c.runtime.pause(&c.id).await.map_err(|e| self.fail("pause", &c.id, e))?;
        c.flags.lock().unwrap().paused = true;
        Ok(Empty::new())
    }

    async fn resume(&self, req: api::ResumeRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        c.runtime.resume(&c.id).await.map_err(|e| self.fail("resume", &c.id, e))?;
        c.flags.lock().unwrap().paused = false;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, req: api::CheckpointTaskRequest) -> TResult<Empty> {
        let c = self.container(&req.id)?;
        let mut opts = CheckpointOptions::default();
        if let Some(any) = req.options.as_ref() {
            if !any.type_url.is_empty() {
                if !any.type_url.ends_with(CHECKPOINT_OPTIONS_TYPE_URL) {
                    return Err(status_error(
                        Code::INVALID_ARGUMENT,
                        format!("options: unsupported type {:?}", any.type_url),
                    ));
                }
                opts = CheckpointOptions::decode(&any.value)
                    .map_err(|e| status_error(Code::INVALID_ARGUMENT, format!("options: {e}")))?;
            }
        }
        let image_path = if opts.image_path.is_empty() { req.path.clone() } else { opts.image_path.clone() };
        let work_path = if opts.work_path.is_empty() { image_path.clone() } else { opts.work_path.clone() };
        for (name, path) in [("path", &image_path), ("work_path", &work_path)] {
            if path.is_empty() || !Path::new(path).is_absolute() {
                return Err(status_error(
                    Code::INVALID_ARGUMENT,
                    format!("{name} {path:?} must be an absolute directory"),
                ));
            }
        }
        self.check_checkpoint_support(&c.runtime, "checkpoint").await?;
        let _guard = c.lock.lock().await;
        if c.init.status() != Status::RUNNING || c.init.has_exited() || c.paused() {
            return Err(precondition(format!(
                "container {:?} is not running; only a running container can be checkpointed",
                c.id
            )));
        }
        make_dirs(&[&image_path, &work_path]).map_err(|e| self.io_fail("checkpoint", &c.id, e))?;
        c.runtime
            .checkpoint(&c.id, &image_path, &work_path, !opts.exit, opts.file_locks)
            .await
            .map_err(|e| self.fail("checkpoint", &c.id, e))?;
        self.log.info(
            "checkpointed",
            &[("container_id", json!(c.id)), ("image_path", json!(image_path)), ("leave_running", json!(!opts.exit))],
        );
        Ok(Empty::new())
    }

    async fn wait(&self, req: api::WaitRequest) -> TResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = self.proc(&c, &req.exec_id)?;
        if !p.exec_id.is_empty() && p.pid() == 0 {
            return Err(precondition(format!("{} has not been started", p.name())));
        }
        p.wait_exited().await;
        let (_, status, at) = p.exit_info();
        Ok(api::WaitResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() })
    }

    async fn connect(&self, req: api::ConnectRequest) -> TResult<api::ConnectResponse> {
        let task_pid = self.containers.lock().unwrap().get(&req.id).map(|c| c.init.pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: VERSION.into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, req: api::ShutdownRequest) -> TResult<Empty> {
        let count = self.containers.lock().unwrap().len();
        if count > 0 && !req.now {
            return Ok(Empty::new());
        }
        self.log.info("shutting down", &[("containers", json!(count)), ("now", json!(req.now))]);
        // Answered first: the server writes the response before the main task, woken, stops it.
        let notify = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            notify.notify_one();
        });
        Ok(Empty::new())
    }

    async fn reopen(&self, cid: &str) -> TResult<()> {
        let c = self.container(cid)?;
        if !c.init.io.has_cri_log() {
            return Err(precondition(format!("container {:?} does not log to a CRI log file", c.id)));
        }
        c.init.io.reopen_log(LOG_OPEN_TIMEOUT).await.map_err(|e| self.io_fail("reopen", cid, e))
    }

    pub fn close(&self) {
        for c in self.containers.lock().unwrap().values() {
            c.runtime.close();
            let procs: Vec<Arc<Proc>> =
                std::iter::once(c.init.clone()).chain(c.execs.lock().unwrap().values().cloned()).collect();
            for p in procs {
                if let Some(h) = p.watcher.lock().unwrap().take() {
                    h.abort();
                }
                p.io.close();
            }
        }
    }
}

/// Accepts runc's connection on the console socket and takes the pty master it sends.
async fn receive_console(listener: tokio::net::UnixListener) -> std::io::Result<OwnedFd> {
    let (conn, _) = listener.accept().await?;
    loop {
        conn.readable().await?;
        match conn.try_io(tokio::io::Interest::READABLE, || recv_fd(conn.as_raw_fd())) {
            Ok(Some(fd)) => return Ok(fd),
            Ok(None) => return Err(std::io::Error::other("runc sent no terminal on the console socket")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn recv_fd(sock: i32) -> std::io::Result<Option<OwnedFd>> {
    let mut buf = [0u8; 4096];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cmsg = [0u8; 64];
    // SAFETY: msghdr over our buffers; the kernel fills at most their sizes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: see above.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32);
                return Ok(Some(OwnedFd::from_raw_fd(fd)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(None)
}

pub fn find_executable(name: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .map(|d| format!("{}/{name}", if d.is_empty() { "." } else { d }))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// From the bundle's spec: whether the init gets a PID namespace of its own, whether shimd asked for the
/// task to be started by Create, and the spec; None: no readable spec.
fn spec_facts(bundle: &str) -> Option<(bool, bool, Value)> {
    let data = std::fs::read(format!("{bundle}/config.json")).ok()?;
    let spec: Value = serde_json::from_slice(&data).ok()?;
    if !spec.is_object() {
        return None;
    }
    let own = spec
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .map(|list| {
            list.iter().any(|ns| {
                ns.get("type").and_then(|t| t.as_str()) == Some("pid")
                    && ns.get("path").and_then(|p| p.as_str()).unwrap_or("").is_empty()
            })
        })
        .unwrap_or(false);
    let start = spec.pointer("/annotations").and_then(|a| a.get(START_ON_CREATE_ANNOTATION)).and_then(|v| v.as_str())
        == Some("true");
    Some((own, start, spec))
}

fn is_sandbox(spec: &Value) -> bool {
    spec.pointer("/annotations").and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION)).and_then(|v| v.as_str())
        == Some("sandbox")
}

fn runc_options(any: Option<&Any>, namespace: &str) -> TResult<RuncOptions> {
    let mut opts = RuncOptions::new(namespace);
    let Some(any) = any else { return Ok(opts) };
    if any.type_url.is_empty() {
        return Ok(opts);
    }
    if !any.type_url.ends_with(RUNC_OPTIONS_TYPE_URL) {
        return Err(status_error(Code::INVALID_ARGUMENT, format!("options: unsupported type {:?}", any.type_url)));
    }
    let fields =
        decode_fields(&any.value).map_err(|e| status_error(Code::INVALID_ARGUMENT, format!("options: {e}")))?;
    for (num, field) in fields {
        match (num, field) {
            (1, Field::Varint(v)) => opts.no_pivot_root = v != 0,
            (2, Field::Varint(v)) => opts.no_new_keyring = v != 0,
            (6, Field::Bytes(b)) if !b.is_empty() => opts.binary = String::from_utf8_lossy(&b).into_owned(),
            (7, Field::Bytes(b)) if !b.is_empty() => opts.root = String::from_utf8_lossy(&b).into_owned(),
            (9, Field::Varint(v)) => opts.systemd_cgroup = v != 0,
            _ => {}
        }
    }
    Ok(opts)
}

#[derive(Default)]
struct CheckpointOptions {
    exit: bool,
    file_locks: bool,
    image_path: String,
    work_path: String,
}

impl CheckpointOptions {
    fn decode(data: &[u8]) -> Result<Self, String> {
        let mut o = CheckpointOptions::default();
        for (num, field) in decode_fields(data)? {
            match (num, field) {
                (1, Field::Varint(v)) => o.exit = v != 0,
                (5, Field::Varint(v)) => o.file_locks = v != 0,
                (8, Field::Bytes(b)) => o.image_path = String::from_utf8_lossy(&b).into_owned(),
                (9, Field::Bytes(b)) => o.work_path = String::from_utf8_lossy(&b).into_owned(),
                _ => {}
            }
        }
        Ok(o)
    }
}

enum Field {
    Varint(u64),
    Bytes(Vec<u8>),
    Other,
}

/// The runc options messages are not in containerd-shim-protos: their few scalar fields are read here.
fn decode_fields(data: &[u8]) -> Result<Vec<(u32, Field)>, String> {
    let mut s = CodedInputStream::from_bytes(data);
    let mut out = Vec::new();
    while !s.eof().map_err(|e| e.to_string())? {
        let tag = s.read_raw_varint32().map_err(|e| e.to_string())?;
        let (num, wire) = (tag >> 3, tag & 7);
        let field = match wire {
            0 => Field::Varint(s.read_raw_varint64().map_err(|e| e.to_string())?),
            2 => Field::Bytes(s.read_bytes().map_err(|e| e.to_string())?),
            1 => {
                s.read_raw_little_endian64().map_err(|e| e.to_string())?;
                Field::Other
            }
            5 => {
                s.read_raw_little_endian32().map_err(|e| e.to_string())?;
                Field::Other
            }
            _ => return Err(format!("unsupported wire type {wire}")),
        };
        out.push((num, field));
    }
    Ok(out)
}

fn encode_string_field(num: u32, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut s = CodedOutputStream::vec(&mut out);
        let _ = s.write_string(num, value);
        let _ = s.flush();
    }
    out
}

/// data at path, whole or not at all (a rename); `durable`: on disk before the rename.
pub fn write_atomic(path: &str, data: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = format!("{path}.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

fn make_dirs(paths: &[&str]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for p in paths {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p)?;
    }
    Ok(())
}

struct TaskApi(Arc<TaskService>);

type Ctx = TtrpcContext;

#[async_trait]
impl Task for TaskApi {
    async fn state(&self, _: &Ctx, req: api::StateRequest) -> TResult<api::StateResponse> {
        self.0.state(req).await
    }
    async fn create(&self, _: &Ctx, req: api::CreateTaskRequest) -> TResult<api::CreateTaskResponse> {
        self.0.create(req).await
    }
    async fn start(&self, _: &Ctx, req: api::StartRequest) -> TResult<api::StartResponse> {
        self.0.start(req).await
    }
    async fn delete(&self, _: &Ctx, req: api::DeleteRequest) -> TResult<api::DeleteResponse> {
        self.0.delete(req).await
    }
    async fn pids(&self, _: &Ctx, req: api::PidsRequest) -> TResult<api::PidsResponse> {
        self.0.pids(req).await
    }
    async fn pause(&self, _: &Ctx, req: api::PauseRequest) -> TResult<Empty> {
        self.0.pause(req).await
    }
    async fn resume(&self, _: &Ctx, req: api::ResumeRequest) -> TResult<Empty> {
        self.0.resume(req).await
    }
    async fn checkpoint(&self, _: &Ctx, req: api::CheckpointTaskRequest) -> TResult<Empty> {
        self.0.checkpoint(req).await
    }
    async fn kill(&self, _: &Ctx, req: api::KillRequest) -> TResult<Empty> {
        self.0.kill(req).await
    }
    async fn exec(&self, _: &Ctx, req: api::ExecProcessRequest) -> TResult<Empty> {
        self.0.exec(req).await
    }
    async fn resize_pty(&self, _: &Ctx, req: api::ResizePtyRequest) -> TResult<Empty> {
        self.0.resize_pty(req).await
    }
    async fn close_io(&self, _: &Ctx, req: api::CloseIORequest) -> TResult<Empty> {
        self.0.close_io(req).await
    }
    async fn update(&self, _: &Ctx, req: api::UpdateTaskRequest) -> TResult<Empty> {
        self.0.update(req).await
    }
    async fn wait(&self, _: &Ctx, req: api::WaitRequest) -> TResult<api::WaitResponse> {
        self.0.wait(req).await
    }
    async fn stats(&self, _: &Ctx, _: api::StatsRequest) -> TResult<api::StatsResponse> {
        Err(status_error(Code::UNIMPLEMENTED, "stats are not implemented by this shim yet"))
    }
    async fn connect(&self, _: &Ctx, req: api::ConnectRequest) -> TResult<api::ConnectResponse> {
        self.0.connect(req).await
    }
    async fn shutdown(&self, _: &Ctx, req: api::ShutdownRequest) -> TResult<Empty> {
        self.0.shutdown(req).await
    }
}

/// shimd.shim.v1.Logs/Reopen: its request is a ConnectRequest (the container id), its answer Empty.
struct ReopenMethod(Arc<TaskService>);

#[async_trait]
impl MethodHandler for ReopenMethod {
    async fn handler(&self, _ctx: TtrpcContext, req: ttrpc::Request) -> TResult<ttrpc::Response> {
        let mut res = ttrpc::Response::new();
        let parsed = api::ConnectRequest::parse_from_bytes(&req.payload);
        let outcome = match parsed {
            Ok(r) => self.0.reopen(&r.id).await,
            Err(e) => Err(status_error(Code::INVALID_ARGUMENT, format!("bad request: {e}"))),
        };
        match outcome {
            Ok(()) => {
                res.set_status(get_status(Code::OK, ""));
                res.payload = Empty::new().write_to_bytes().unwrap_or_default();
            }
            Err(ttrpc::Error::RpcStatus(s)) => res.set_status(s),
            Err(e) => res.set_status(get_status(Code::UNKNOWN, format!("{e:?}"))),
        }
        Ok(res)
    }
}
