//! The container image of packaging/container/build.sh. Its root file
//! system (`--rootfs-only`, from the binary under test) run as a container
//! runtime runs it: preforkd as PID 1 of its own PID namespace (`unshare
//! --pid --fork --mount-proc`), chrooted into the root (`--root`), as the
//! image's user 65532, with the image's own config, its addresses moved
//! to loopback port 0 and a second service added: `exec` of a helper that
//! double-forks, so that its grandchild is orphaned to PID 1. Checked: it
//! serves over TCP (the namespace shares the host's network), it is PID 1
//! there, it reaps the orphan (no zombie left in the namespace), and
//! SIGTERM makes it exit 0 within shutdown_delay + graceful_timeout,
//! answering `/ready` 503 during the delay. And, where umoci is installed,
//! the packed image: its entrypoint, user and ports (the config's), and a
//! layer with the binary, its loader and no shell.
//!
//! Needs root, unshare (util-linux), a C compiler for the helper (gcc)
//! and, for the image, umoci; each test skips with one line naming what
//! is missing.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The image's config, as shipped.
fn shipped_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/container/preforkd.toml");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The helper the `exec` service runs per connection: the classic daemon
/// double fork. Its child leaves the session, forks the grandchild, writes
/// the grandchild's pid (as the namespace numbers it) to the client and
/// exits; the program waits for it and exits. The grandchild closes the
/// connection's descriptors (so the client gets its end of stream) and
/// waits for a signal: its parent gone, it belongs to PID 1.
const ORPHAN_C: &str = r#"#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    pid_t child = fork();
    if (child < 0)
        return 1;
    if (child == 0) {
        setsid();
        pid_t grandchild = fork();
        if (grandchild < 0)
            _exit(1);
        if (grandchild > 0) {
            printf("orphan %d\n", (int)grandchild);
            fflush(stdout);
            _exit(0);
        }
        close(0);
        close(1);
        close(2);
        for (;;)
            pause();
    }
    int status;
    waitpid(child, &status, 0);
    return 0;
}
"#;

/// `tool` on the PATH.
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// Runs packaging/container/build.sh with the binary under test and
/// `args`, into `out`; returns the path it printed last.
fn build(out: &Path, args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/container/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .arg("--binary")
        .arg(bin())
        .arg("--out")
        .arg(out)
        .output()
        .expect("run bash");
    assert!(output.status.success(), "build.sh: {}", show(&output));
    let printed = stdout(&output);
    PathBuf::from(printed.lines().last().unwrap_or_default())
}

/// The `NAME:` line of /proc/PID/status, after the name.
fn status_field(pid: i32, name: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// The PID namespace of a process (the target of /proc/PID/ns/pid).
fn pid_ns(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Every process in the PID namespace `ns`: (host pid, pid in the
/// namespace, state).
fn in_namespace(ns: &Path) -> Vec<(i32, i32, char)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid_ns(pid).as_deref() == Some(ns))
        .filter_map(|pid| {
            let inner = status_field(pid, "NSpid")?
                .split_whitespace()
                .last()?
                .parse()
                .ok()?;
            Some((pid, inner, state(pid)?))
        })
        .collect()
}

/// The skips of the PID 1 test: root, unshare that works here, cc.
fn pid1_prerequisites() -> Option<(PathBuf, PathBuf)> {
    if !is_root() {
        eprintln!("skipped: needs root (unshare --pid and a chroot)");
        return None;
    }
    let Some(unshare) = which("unshare") else {
        eprintln!("skipped: unshare not installed (apt-get install util-linux)");
        return None;
    };
    let Some(cc) = which("cc") else {
        eprintln!("skipped: cc not installed (apt-get install gcc)");
        return None;
    };
    let probe = Command::new(&unshare)
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output()
        .expect("run unshare");
    if !probe.status.success() {
        eprintln!(
            "skipped: unshare --pid --fork --mount-proc fails here: {}",
            stderr(&probe).trim()
        );
        return None;
    }
    Some((unshare, cc))
}

/// Compiles [`ORPHAN_C`] into the root as /usr/bin/orphan: static, or
/// else linked against the libc the root already has (the binary's).
/// False (and a line saying why) if neither works.
fn add_helper(cc: &Path, src_dir: &Path, root: &Path) -> bool {
    let src = src_dir.join("orphan.c");
    fs::write(&src, ORPHAN_C).unwrap();
    let target = root.join("usr/bin/orphan");
    let compile = |extra: &[&str]| {
        Command::new(cc)
            .args(extra)
            .arg("-O2")
            .arg("-o")
            .arg(&target)
            .arg(&src)
            .output()
            .expect("run cc")
    };
    if compile(&["-static"]).status.success() {
        return true;
    }
    let dynamic = compile(&[]);
    if !dynamic.status.success() {
        eprintln!("skipped: cc cannot build the helper: {}", stderr(&dynamic));
        return false;
    }
    // Its libraries must be in the root (they are the binary's: libc).
    let ldd = Command::new("ldd").arg(&target).output().expect("run ldd");
    let missing: Vec<String> = stdout(&ldd)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .filter(|lib| !root.join(lib.trim_start_matches('/')).exists())
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped: cc -static fails (apt-get install libc6-dev) and the dynamic helper needs {missing:?}, not in the image"
        );
        return false;
    }
    true
}

/// The image's config with its addresses on loopback port 0, debug logs
/// (the master logs the orphans it reaps at debug), and the exec service.
fn test_config(shipped: &str) -> String {
    let moved = shipped
        .replace("\"tcp://0.0.0.0:8009\"", "\"tcp://127.0.0.1:0\"")
        .replace("\"0.0.0.0:9109\"", "\"127.0.0.1:0\"")
        .replace("level = \"info\"", "level = \"debug\"");
    assert!(
        !moved.contains("0.0.0.0") && moved.contains("level = \"debug\""),
        "packaging/container/preforkd.toml changed: update this test's replacements:\n{moved}"
    );
    format!(
        "{moved}\n[[service]]\nname = \"orphan\"\nlisten = [\"tcp://127.0.0.1:0\"]\nworkers = 1\n\n\
         [service.handler]\nplugin = \"exec\"\n\n[service.handler.options]\ncommand = [\"/usr/bin/orphan\"]\n"
    )
}

/// A duration of the shipped config (`[table] key`), as preforkd reads it.
fn config_duration(config: &toml::Table, table: &str, key: &str) -> Duration {
    let value = match table {
        "service" => &config["service"].as_array().unwrap()[0][key],
        _ => &config[table][key],
    };
    humantime::parse_duration(value.as_str().unwrap()).unwrap()
}

#[test]
fn the_image_root_runs_preforkd_as_pid_1_which_reaps_orphans() {
    let Some((unshare, cc)) = pid1_prerequisites() else {
        return;
    };
    let dir = tempdir();
    let root = build(&dir.path().join("image"), &["--rootfs-only"]);
    assert_eq!(root, dir.path().join("image/rootfs"));
    if !add_helper(&cc, dir.path(), &root) {
        return;
    }
    let shipped = shipped_config();
    fs::write(root.join("etc/preforkd/test.toml"), test_config(&shipped)).unwrap();

    let mut cmd = Command::new(&unshare);
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(format!("--root={}", root.display()))
        .args(["--setuid", "65532", "--setgid", "65532"])
        .args(["/usr/bin/preforkd", "-c", "/etc/preforkd/test.toml"]);
    let mut d = Daemon::spawn(cmd, dir, &[]);
    // unshare's one child is preforkd, PID 1 of the new namespace.
    let master = wait_for(DEADLINE, || {
        let c = children(d.pid());
        (c.len() == 1 && title(c[0]).starts_with("preforkd")).then(|| c[0])
    })
    .unwrap_or_else(|| panic!("no preforkd under unshare; log:\n{}", d.log_text()));
    d.wait_ready();
    let nspid = status_field(master, "NSpid").unwrap();
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [master.to_string().as_str(), "1"],
        "NSpid of the master (host pid {master})"
    );
    assert!(d.log_text().contains("preforkd[1]: INFO: master pid 1 "));
    let uid = status_field(master, "Uid").unwrap();
    assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["65532"; 4]);
    let ns = pid_ns(master).unwrap();
    assert_ne!(Some(&ns), pid_ns(std::process::id() as i32).as_ref());

    // (a) It serves, over the host's loopback.
    let echo = d.addr("tcp", "echo");
    echo_once(echo, b"hello from the host\n").unwrap();

    // (c) The orphan: reparented to PID 1, then reaped by it once it dies.
    let mut s = connect(d.addr("tcp", "orphan")).unwrap();
    let said = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let inner: i32 = said
        .strip_prefix("orphan ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the helper said {said:?}; log:\n{}", d.log_text()));
    let (orphan, _, st) = in_namespace(&ns)
        .into_iter()
        .find(|&(_, i, _)| i == inner)
        .unwrap_or_else(|| panic!("no pid {inner} in the namespace: {:?}", in_namespace(&ns)));
    assert_ne!(st, 'Z', "the orphan died early");
    assert_eq!(
        status_field(orphan, "PPid").as_deref(),
        Some(master.to_string().as_str()),
        "the orphan's parent is not PID 1 (host pid {master})"
    );
    // SAFETY: kill(2) has no memory effects.
    assert_eq!(unsafe { libc::kill(orphan, libc::SIGTERM) }, 0);
    let reaped = wait_for(DEADLINE, || {
        let left = in_namespace(&ns);
        let zombies: Vec<_> = left.iter().filter(|p| p.2 == 'Z').collect();
        (state(orphan).is_none() && zombies.is_empty()).then_some(())
    });
    assert!(
        reaped.is_some(),
        "a zombie is left in the namespace: {:?}; log:\n{}",
        in_namespace(&ns),
        d.log_text()
    );
    d.wait_log(&format!("reaped pid {inner}, not a worker"));

    // (d) SIGTERM: /ready says 503 for the shutdown delay while the
    // service still serves, then a graceful stop and exit 0.
    let config: toml::Table = shipped.parse().unwrap();
    let delay = config_duration(&config, "daemon", "shutdown_delay");
    let graceful = config_duration(&config, "service", "graceful_timeout");
    assert!(
        delay > Duration::ZERO,
        "the image's config has no shutdown_delay"
    );
    let ready = metrics_url(&d).replace("/metrics", "/ready");
    assert_eq!(http("GET", &ready).0, 200);
    // SAFETY: kill(2) has no memory effects.
    assert_eq!(unsafe { libc::kill(master, libc::SIGTERM) }, 0);
    let (code, _, body) = wait_for(DEADLINE, || {
        let got = http("GET", &ready);
        (got.0 != 200).then_some(got)
    })
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shutdown delay"), "{body}");
    echo_once(echo, b"served during the delay\n").unwrap();
    let exit = d.wait_exit(delay + graceful);
    assert_eq!(exit.code(), Some(0), "log:\n{}", d.log_text());
    // PID 1 gone: the kernel has emptied the namespace.
    assert!(in_namespace(&ns).is_empty(), "{:?}", in_namespace(&ns));
}

/// The names in a gzipped tar (`tar tzf`), without a leading `./`.
fn tar_names(layer: &Path) -> BTreeSet<String> {
    let out = Command::new("tar")
        .arg("tzf")
        .arg(layer)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", show(&out));
    stdout(&out)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != ".")
        .collect()
}

fn json_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
}

#[test]
fn the_packed_image_runs_the_config_as_65532_and_has_no_shell() {
    if which("umoci").is_none() {
        eprintln!("skipped: umoci not installed (apt-get install umoci)");
        return;
    }
    if !is_root() {
        // The root's files are root's in the layer only when built as root.
        eprintln!("skipped: needs root (the layer's files are owned by uid 0)");
        return;
    }
    let dir = tempdir();
    let layout = build(dir.path(), &[]);
    assert_eq!(layout, dir.path().join("oci"));

    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let tags: BTreeSet<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(tags, BTreeSet::from(["latest", version]));
    let manifest = json_blob(&layout, index["manifests"][0]["digest"].as_str().unwrap());
    let image = json_blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    let c = &image["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/bin/preforkd", "-c", "/etc/preforkd/preforkd.toml"])
    );
    assert!(c["Cmd"].is_null(), "{c}");
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], version);

    // The exposed ports are the config's: its service's and its metrics'.
    let config: toml::Table = shipped_config().parse().unwrap();
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_string();
    let mut ports: BTreeSet<String> = config["service"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["listen"].as_array().unwrap().iter())
        .map(|l| format!("{}/tcp", port(l.as_str().unwrap())))
        .collect();
    ports.insert(format!(
        "{}/tcp",
        port(config["metrics"]["listen"].as_str().unwrap())
    ));
    let exposed: BTreeSet<String> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(exposed, ports);

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let hex = layers[0]["digest"].as_str().unwrap();
    let names = tar_names(&layout.join("blobs/sha256").join(&hex[7..]));
    // The loader, as ldd names it for the binary (its PT_INTERP).
    let ldd = Command::new("ldd").arg(bin()).output().expect("run ldd");
    let loader = stdout(&ldd)
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('/'))
        .and_then(|l| l.split_whitespace().next())
        .map(|l| l.trim_start_matches('/').to_string())
        .unwrap_or_else(|| panic!("no loader in ldd's output: {}", show(&ldd)));
    for needed in [
        "usr/bin/preforkd",
        &loader,
        "etc/passwd",
        "etc/group",
        "etc/preforkd/preforkd.toml",
        "tmp",
        "run/preforkd",
    ] {
        assert!(
            names.contains(needed),
            "{needed} not in the layer: {names:?}"
        );
    }
    let shells: Vec<&String> = names
        .iter()
        .filter(|n| {
            ["sh", "bash", "dash", "busybox"]
                .iter()
                .any(|s| n.ends_with(&format!("/{s}")))
        })
        .collect();
    assert!(shells.is_empty(), "a shell in the image: {shells:?}");
    let passwd = fs::read_to_string(dir.path().join("rootfs/etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("preforkd:x:65532:65532:")),
        "{passwd}"
    );
}
