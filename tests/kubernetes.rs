//! The Kubernetes manifests of packaging/kubernetes/: valid objects of a
//! pinned Kubernetes version (`kubernetes-validate --strict`, which
//! rejects unknown fields), a ConfigMap whose preforkd.toml is the
//! container image's config and passes `preforkd check`, and what no
//! schema can see: the Deployment fits that config. Its grace period
//! outlasts shutdown_delay + graceful_timeout, its probes ask `/ready` and
//! `/live` on the config's `[metrics]` port, its readiness probe notices
//! within the shutdown delay, every path the config writes is on a
//! volume (the root file system is read-only), the security context is
//! the restricted one, and the Service and the disruption budget select
//! its pods.
//!
//! Needs kubernetes-validate (`pip install kubernetes-validate==1.37.0`),
//! which brings PyYAML: the manifests are read with python3 and PyYAML as
//! JSON. Each test skips with one line naming what is missing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The Kubernetes version the manifests are validated against: the
/// oldest release they are meant for.
const KUBERNETES_VERSION: &str = "1.35.0";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes")
}

/// The manifests, sorted by name.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

/// `tool` on the PATH.
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Every object of every manifest, through PyYAML (as JSON); None, with
/// a line saying so, if python3 or PyYAML is missing.
fn objects() -> Option<Vec<Value>> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let Some(python) = which("python3") else {
        eprintln!("skipped: python3 not installed (apt-get install python3-yaml)");
        return None;
    };
    let probe = Command::new(&python)
        .args(["-c", "import yaml"])
        .output()
        .expect("run python3");
    if !probe.status.success() {
        eprintln!("skipped: PyYAML not installed (pip install kubernetes-validate==1.37.0)");
        return None;
    }
    let out = Command::new(&python)
        .arg("-c")
        .arg(TO_JSON)
        .args(manifest_files())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "reading the manifests: {}",
        show(&out)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    Some(docs)
}

/// The one object of `kind`.
fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected: {found:?}");
    found[0]
}

/// The preforkd.toml of the ConfigMap the Deployment mounts.
fn mounted_config(objects: &[Value]) -> String {
    let cm = one(objects, "ConfigMap");
    let volumes = &one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"];
    let config_volume = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .unwrap_or_else(|| panic!("no volume of the ConfigMap: {volumes}"));
    assert!(
        config_volume["configMap"]["items"].is_null(),
        "all of the ConfigMap's keys are files"
    );
    cm["data"]["preforkd.toml"]
        .as_str()
        .expect("the ConfigMap has a preforkd.toml")
        .to_string()
}

fn duration(v: &toml::Value) -> Duration {
    humantime::parse_duration(v.as_str().unwrap()).unwrap()
}

fn seconds(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number of seconds: {v}"))
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let Some(validate) = which("kubernetes-validate") else {
        eprintln!(
            "skipped: kubernetes-validate not installed (pip install kubernetes-validate==1.37.0)"
        );
        return;
    };
    let out = Command::new(validate)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(manifest_files())
        .output()
        .expect("run kubernetes-validate");
    assert!(out.status.success(), "{}", show(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    for file in manifest_files() {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            text.lines()
                .any(|l| l.contains(&name) && l.contains(" passed for resource ")),
            "{name} not validated: {text}"
        );
    }
}

#[test]
fn the_configmap_holds_the_image_config_and_it_passes_check() {
    let Some(objects) = objects() else {
        return;
    };
    let config = mounted_config(&objects);
    let image = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/container/preforkd.toml"),
    )
    .unwrap();
    assert_eq!(
        config, image,
        "the ConfigMap's preforkd.toml and packaging/container/preforkd.toml differ"
    );
    // The control socket's directory is a volume in the pod; here, a
    // temporary directory stands for it (`check` wants it to exist).
    let run = tempdir();
    let path = run.path().join("preforkd.toml");
    let here = config.replace("/run/preforkd/", &format!("{}/", run.path().display()));
    assert_ne!(
        here, config,
        "the config has no /run/preforkd path any more"
    );
    fs::write(&path, here).unwrap();
    let out = run_cli(&path, &["check"]);
    assert!(out.status.success(), "preforkd check: {}", show(&out));
    assert!(
        stdout(&out).contains("configuration is valid"),
        "{}",
        show(&out)
    );
}

#[test]
fn the_deployment_fits_its_config() {
    let Some(objects) = objects() else {
        return;
    };
    let config: toml::Table = mounted_config(&objects).parse().unwrap();
    let deployment = one(&objects, "Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    assert_eq!(spec["replicas"], 3);
    let rolling = &spec["strategy"]["rollingUpdate"];
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(rolling["maxUnavailable"], 0, "{rolling}");
    assert_eq!(rolling["maxSurge"], 1, "{rolling}");

    // The kubelet's SIGKILL comes after every deadline of the stop.
    let delay = duration(&config["daemon"]["shutdown_delay"]);
    let services = config["service"].as_array().unwrap();
    let graceful = services
        .iter()
        .map(|s| duration(&s["graceful_timeout"]))
        .max()
        .unwrap();
    let grace = seconds(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        Duration::from_secs(grace) > delay + graceful,
        "terminationGracePeriodSeconds {grace} <= shutdown_delay {delay:?} + graceful_timeout {graceful:?}"
    );
    assert!(
        c["lifecycle"]["preStop"].is_null(),
        "no preStop: shutdown_delay does it"
    );

    // The probes: /ready and /live on the [metrics] port, which listens on
    // the pod's address (the kubelet probes that, not loopback).
    let metrics: std::net::SocketAddr = config["metrics"]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        metrics.ip().is_unspecified(),
        "[metrics] listen {metrics}: probes come from outside the pod"
    );
    let ports = c["ports"].as_array().unwrap();
    let port_number = |port: &Value| -> u64 {
        match port.as_str() {
            Some(name) => ports
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port named {name}")),
            None => port.as_u64().unwrap(),
        }
    };
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            port_number(&get["port"]),
            u64::from(metrics.port()),
            "{probe}"
        );
        assert!(get["host"].is_null(), "{probe} goes to the pod's address");
    }
    // Readiness follows /ready within the delay (for balancers that go by
    // pod readiness): period x failureThreshold <= shutdown_delay.
    let ready = &c["readinessProbe"];
    let period = ready["periodSeconds"].as_u64().unwrap_or(10);
    let fall = ready["failureThreshold"].as_u64().unwrap_or(3);
    assert!(
        Duration::from_secs(period * fall) <= delay,
        "readinessProbe: {period} s x {fall} > shutdown_delay {delay:?}"
    );

    // Every TCP port the services listen on is a container port.
    for s in services {
        for l in s["listen"].as_array().unwrap() {
            let addr = l.as_str().unwrap().strip_prefix("tcp://").unwrap();
            let port: u64 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
            assert!(
                ports
                    .iter()
                    .any(|p| p["containerPort"] == port && p["protocol"] == "TCP"),
                "{addr} is not a container port"
            );
        }
    }

    // A read-only root: what the config writes is on a volume, and the
    // config is mounted where the image's entrypoint reads it.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let on_volume = |path: &str| {
        mounts.iter().any(|m| {
            let at = m["mountPath"].as_str().unwrap();
            Path::new(path).starts_with(at) && m["readOnly"] != true
        })
    };
    let socket = config["control"]["socket"].as_str().unwrap();
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    assert!(
        on_volume(socket),
        "{socket} is on no writable volume: {mounts:?}"
    );
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/etc/preforkd")
        .expect("the config is mounted at /etc/preforkd");
    assert_eq!(config_mount["readOnly"], true);
    assert_ne!(socket_dir, "/etc/preforkd");

    // The restricted security context, as the image runs (uid 65532).
    let sc = &c["securityContext"];
    let either = |key: &str| {
        if sc[key].is_null() {
            pod["securityContext"][key].clone()
        } else {
            sc[key].clone()
        }
    };
    assert_eq!(either("runAsNonRoot"), true);
    assert_eq!(either("runAsUser"), 65532);
    assert_eq!(either("seccompProfile")["type"], "RuntimeDefault");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for kind in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][what].is_string(),
                "resources.{kind}.{what}"
            );
        }
    }

    // The Service and the budget select these pods, by the echo port.
    let labels = &spec["template"]["metadata"]["labels"];
    let selects = |selector: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(selects(&spec["selector"]["matchLabels"]));
    let service = one(&objects, "Service");
    assert!(selects(&service["spec"]["selector"]), "{service}");
    for p in service["spec"]["ports"].as_array().unwrap() {
        let target = port_number(&p["targetPort"]);
        assert_ne!(
            target,
            u64::from(metrics.port()),
            "the Service exposes the metrics port"
        );
    }
    let pdb = one(&objects, "PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"]), "{pdb}");
}
