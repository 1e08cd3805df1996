//! shimd's runc shim, compiled: `shimd-runc-shim -namespace NS -address ADDR -id ID start|delete|serve`.
//!
//! It speaks the same ttrpc task API as the Python shim (shims/runc), invoked like any containerd shim v2
//! binary with cwd = the pod's bundle directory:
//! - `start` launches the long-lived shim (own session, stdio detached), waits until it answers on its
//!   socket, prints `unix://<socket>` and writes it to ./address; a shim already serving that id is reused.
//! - `delete` cleans up after a dead shim: force-deletes the runc container named by -id, unmounts
//!   ./rootfs and prints a DeleteResponse.
//! - `serve` is the long-lived shim itself (shimd's direct launch runs it on a socket it bound).
//!
//! Why a compiled shim: a CPython shim keeps ~3.5 MiB private per pod whatever is done to it (docs/design.md).

mod cgroup_kill;
mod cgroup_lock;
mod cgroupfs;
mod fd;
mod log;
mod mounts;
mod paths;
mod pause;
mod reaped_delete;
mod reaper;
mod runc_state;
mod runtime;
mod service;
mod stdio;
mod writer;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

const USAGE: &str =
    "usage: shimd-runc-shim -namespace NS -address ADDR [-publish-binary P] -id ID [-bundle DIR] [-debug] start|delete";

/// Go flag syntax (-name value / --name=value / -debug), then the command.
fn parse_args(argv: &[String]) -> Result<(HashMap<String, String>, String), String> {
    let mut flags = HashMap::new();
    let mut i = 0;
    while i < argv.len() && argv[i].starts_with('-') {
        let mut name = argv[i].trim_start_matches('-').to_string();
        let value;
        if let Some((n, v)) = name.split_once('=') {
            value = v.to_string();
            name = n.to_string();
        } else if name == "debug" || name == "v" || name == "detach" {
            value = "true".into();
        } else {
            i += 1;
            value = argv.get(i).cloned().ok_or_else(|| format!("flag -{name} needs a value\n{USAGE}"))?;
        }
        flags.insert(name, value);
        i += 1;
    }
    let command = argv.get(i).cloned().ok_or_else(|| USAGE.to_string())?;
    Ok((flags, command))
}

fn socket_path(flags: &HashMap<String, String>) -> String {
    let base = std::env::var("SHIMD_SHIM_DIR").ok().filter(|d| !d.is_empty()).unwrap_or_else(|| {
        let address = flags.get("address").filter(|a| !a.is_empty()).cloned().unwrap_or_else(|| "/run/shimd/x".into());
        let dir = std::path::Path::new(&address).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{dir}/s")
    });
    paths::socket_path(&base, flags.get("namespace").map(String::as_str).unwrap_or(""), &flags["id"])
}

fn answers(path: &str) -> bool {
    UnixStream::connect(path).is_ok()
}

fn close_fds_from(first: u32, keep: Option<RawFd>) {
    // close_range(2) where the kernel has it (5.9), else one close per open descriptor.
    let keep = keep.filter(|k| *k >= first as RawFd);
    let ranges: Vec<(u32, u32)> = match keep {
        Some(k) => vec![(first, k as u32 - 1), (k as u32 + 1, u32::MAX)],
        None => vec![(first, u32::MAX)],
    };
    for (lo, hi) in ranges {
        if lo > hi {
            continue;
        }
        // SAFETY: closes descriptors only.
        if unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0) } != 0 {
            if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                let fds: Vec<u32> =
                    dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
                for fd in fds.into_iter().filter(|fd| *fd >= lo && *fd <= hi) {
                    // SAFETY: see above.
                    unsafe { libc::close(fd as i32) };
                }
            }
        }
    }
}

fn cmd_start(flags: &HashMap<String, String>, raw: &[String]) -> i32 {
    use std::os::unix::process::CommandExt;
    let path = socket_path(flags);
    let address = format!("unix://{path}");
    if std::path::Path::new(&path).exists() {
        if answers(&path) {
            let _ = service::write_atomic("address", address.as_bytes(), true);
            println!("{address}");
            return 0;
        }
        let _ = std::fs::remove_file(&path); // stale socket of a dead shim
    }
    if let Some(dir) = std::path::Path::new(&path).parent() {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| "shimd-runc-shim".into());
    let errlog = std::fs::OpenOptions::new().create(true).append(true).open("shim.stderr.log");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&raw[..raw.len() - 1])
        .arg("serve")
        .env("SHIMD_SHIM_SOCKET", &path)
        .env_remove(paths::LISTEN_FD_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    match errlog {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(std::process::Stdio::null()),
    };
    // SAFETY: setsid and close are async-signal-safe. Whatever else the caller let us inherit must not
    // reach the long-lived shim: a kept copy of the caller's pipe would stop it from ever seeing EOF.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            close_fds_from(3, None);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the shim: {e}");
            return 1;
        }
    };
    let timeout = std::env::var("SHIMD_SHIM_START_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(20.0);
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("shim exited during start-up ({status}); see shim.stderr.log");
            return 1;
        }
        if answers(&path) {
            let _ = service::write_atomic("address", address.as_bytes(), true);
            println!("{address}");
            return 0;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("shim did not start listening in time");
    1
}

/// Best-effort cleanup of one container after its shim died (containerd calls this).
fn cmd_delete(flags: &HashMap<String, String>) -> i32 {
    let bundle = flags
        .get("bundle")
        .cloned()
        .unwrap_or_else(|| std::env::current_dir().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default());
    let opts: serde_json::Value = std::fs::read(format!("{bundle}/options.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or(json!({}));
    let s = |k: &str| opts.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_string);
    let namespace = flags.get("namespace").cloned().unwrap_or_else(|| "default".into());
    let mut argv = vec![
        s("binary_name").unwrap_or_else(|| "runc".into()),
        "--root".into(),
        s("root").unwrap_or_else(|| format!("/run/containerd/runc/{namespace}")),
    ];
    if opts.get("systemd_cgroup").and_then(|v| v.as_bool()).unwrap_or(false) {
        argv.push("--systemd-cgroup".into());
    }
    let _ = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .args(["delete", "--force", &flags["id"]])
        .stdin(std::process::Stdio::null())
        .output();
    if let Err(e) = mounts::unmount(&format!("{bundle}/rootfs")) {
        eprintln!("{e}");
    }
    use containerd_shim_protos::protobuf::Message;
    let now = reaper::now_ns();
    let mut resp = containerd_shim_protos::api::DeleteResponse::new();
    resp.exit_status = 128 + 9;
    let mut ts = containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::new();
    ts.seconds = (now / 1_000_000_000) as i64;
    ts.nanos = (now % 1_000_000_000) as i32;
    resp.exited_at = containerd_shim_protos::protobuf::MessageField::some(ts);
    let out = resp.write_to_bytes().unwrap_or_default();
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(&out);
    let _ = stdout.flush();
    0
}

/// The socket shimd bound for us (direct launch), or None when we bind the path ourselves.
fn inherited_listener() -> Option<RawFd> {
    let fd: RawFd = std::env::var(paths::LISTEN_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(paths::LISTEN_FD_ENV);
    // Handed over inheritable: runc, runsc and hooks must not get our API socket.
    // SAFETY: fcntl on a descriptor number; a bad one just fails.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}

fn cmd_serve(flags: HashMap<String, String>, path: String) -> i32 {
    if flags.get("detach").map(|v| v == "true").unwrap_or(false) {
        // Fork off and let the first process exit at once: the launcher (shimd) only waits for that exit,
        // and the shim, orphaned, is nobody's child to reap. Still single-threaded here.
        // SAFETY: fork before any thread exists; the parent only calls _exit.
        match unsafe { libc::fork() } {
            -1 => {
                eprintln!("fork: {}", std::io::Error::last_os_error());
                return 1;
            }
            0 => {}
            _ => unsafe { libc::_exit(0) },
        }
    }
    let listen_fd = inherited_listener();
    // Descriptors our launcher leaked to us would pin its sockets open for our lifetime.
    close_fds_from(3, listen_fd);
    // One malloc arena: the writer and blocking threads would each get one (touched pages per shim).
    // SAFETY: mallopt before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Blocking work (cgroup lock, cgroup removal) is rare and short: few threads, not kept around.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_keep_alive(Duration::from_secs(2))
        .thread_stack_size(256 << 10)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return 1;
        }
    };
    rt.block_on(serve(flags, path, listen_fd))
}

async fn serve(flags: HashMap<String, String>, path: String, listen_fd: Option<RawFd>) -> i32 {
    let cwd = std::env::current_dir().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| ".".into());
    let writer = writer::FileWriter::new();
    let pod_id = flags["id"].clone();
    let namespace = flags.get("namespace").cloned().unwrap_or_default();
    // (-debug is accepted, as every shim v2 binary takes it; this shim has no debug records.)
    let log = log::Logger::new(
        Some(writer.clone()),
        &format!("{cwd}/shim.log"),
        &[("pod_id", json!(pod_id)), ("namespace", json!(namespace))],
    );
    {
        let log = log.clone();
        writer.set_error_handler(Box::new(move |path, e| {
            log.error("log write failed", &[("path", json!(path)), ("error", json!(e.to_string()))])
        }));
    }
    if let Err(e) = reaper::set_subreaper() {
        log.error("prctl(PR_SET_CHILD_SUBREAPER) failed", &[("error", json!(e.to_string()))]);
        writer.stop(Duration::from_secs(5));
        return 1;
    }
    let reaper = reaper::Reaper::new();
    let reaping = match reaper.start() {
        Ok(h) => h,
        Err(e) => {
            log.error("cannot watch SIGCHLD", &[("error", json!(e.to_string()))]);
            writer.stop(Duration::from_secs(5));
            return 1;
        }
    };
    // Terminal hang-ups and a dying parent must not end the shim; SIGTERM asks for an orderly exit.
    // SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log.error("cannot watch SIGTERM", &[("error", json!(e.to_string()))]);
            return 1;
        }
    };
    let socket_dir = std::path::Path::new(&path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let service = service::TaskService::new(
        &namespace,
        &pod_id,
        &socket_dir,
        reaper.clone(),
        writer.clone(),
        log.clone(),
        stop.clone(),
    );
    let fd = match listen_fd {
        Some(fd) => fd,
        None => {
            let _ = std::fs::remove_file(&path);
            match std::os::unix::net::UnixListener::bind(&path) {
                Ok(l) => l.into_raw_fd(),
                Err(e) => {
                    log.error("cannot listen", &[("address", json!(path)), ("error", json!(e.to_string()))]);
                    writer.stop(Duration::from_secs(5));
                    return 1;
                }
            }
        }
    };
    let mut server = containerd_shim_protos::ttrpc::r#async::Server::new().set_domain_unix();
    server = match server.add_listener(fd) {
        Ok(s) => s.register_service(service.services()),
        Err(e) => {
            log.error("cannot listen", &[("error", json!(e.to_string()))]);
            return 1;
        }
    };
    if let Err(e) = server.start().await {
        log.error("cannot serve", &[("error", json!(e.to_string()))]);
        return 1;
    }
    log.info("shim listening", &[("address", json!(format!("unix://{path}"))), ("pid", json!(std::process::id()))]);
    // SAFETY: malloc_trim has no preconditions; start-up leaves freed heap behind.
    unsafe { libc::malloc_trim(0) };
    tokio::select! {
        _ = stop.notified() => {}
        _ = sigterm.recv() => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await;
    service.close();
    let _ = std::fs::remove_file(&path);
    reaping.abort();
    log.info("shim exiting", &[]);
    writer.stop(Duration::from_secs(5));
    0
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (flags, command) = match parse_args(&argv) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if !flags.contains_key("id") {
        eprintln!("-id is required\n{USAGE}");
        std::process::exit(2);
    }
    let code = match command.as_str() {
        "start" => cmd_start(&flags, &argv),
        "delete" => cmd_delete(&flags),
        "serve" => {
            let path = std::env::var("SHIMD_SHIM_SOCKET")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| socket_path(&flags));
            cmd_serve(flags, path)
        }
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            2
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #[test]
    fn go_flags() {
        let argv: Vec<String> = ["-namespace", "k8s.io", "--address=/a", "-debug", "-id", "p", "start"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, cmd) = super::parse_args(&argv).unwrap();
        assert_eq!(cmd, "start");
        assert_eq!(flags["namespace"], "k8s.io");
        assert_eq!(flags["address"], "/a");
        assert_eq!(flags["debug"], "true");
        assert_eq!(flags["id"], "p");
        assert!(super::parse_args(&argv[..6]).is_err());
    }
}
