"""deploy/kubernetes/, docker-compose.yml, deploy/docker/ and the Dockerfile, checked
without a cluster or a Docker engine: every manifest against the Kubernetes
schemas that kubernetes-validate ships (no network), the pieces against each
other, and every geobouncer config in them loaded by geobouncer's own loader."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from geobouncer.config import load_config
from geobouncer.routing import Hooks

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
#: Kubernetes versions the manifests must be valid for: an old supported one and
#: the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())
LABELS = {"app.kubernetes.io/name": "geobouncer"}


def manifests() -> dict[str, dict]:
    """kind -> the resource, for every document under deploy/kubernetes/."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert doc["kind"] not in found, f"two {doc['kind']}s"
                found[doc["kind"]] = doc
    return found


def test_the_manifests_are_all_there():
    assert set(manifests()) == {
        "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Deployment", "Service",
                                  "PodDisruptionBudget"])
def test_manifest_is_valid_against_the_kubernetes_schema(kind, version):
    resource = manifests()[kind]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{kind} invalid for Kubernetes {version}: {exc.message} at "
                    f"{'/'.join(map(str, exc.path))}")


def test_the_validator_catches_a_mistake():
    """The schema check is real: a misspelt field fails it."""
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_deployment_service_and_budget_select_the_same_pods():
    m = manifests()
    deployment = m["Deployment"]["spec"]
    assert deployment["selector"]["matchLabels"] == LABELS
    assert deployment["template"]["metadata"]["labels"] == LABELS
    assert m["Service"]["spec"]["selector"] == LABELS
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == LABELS
    assert m["PodDisruptionBudget"]["spec"]["minAvailable"] < deployment["replicas"]


def pod_spec() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]


def config_files(tmp_path: Path) -> Path:
    """The ConfigMap's and the Secret's files, as the projected volume mounts them."""
    m = manifests()
    names = [s.get("configMap", s.get("secret"))["name"]
             for s in pod_spec()["volumes"][0]["projected"]["sources"]]
    assert names == [m["ConfigMap"]["metadata"]["name"], m["Secret"]["metadata"]["name"]]
    for name, text in {**m["ConfigMap"]["data"], **m["Secret"]["stringData"]}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / "geobouncer.ini"


def test_the_configmap_ini_loads_and_matches_the_pod(tmp_path):
    ini = config_files(tmp_path)
    cfg = load_config(ini)
    container = pod_spec()["containers"][0]
    # The command names the mounted ini; the mount holds the ConfigMap and Secret.
    assert container["args"][-1] == "/etc/geobouncer/geobouncer.ini"
    assert container["volumeMounts"][0]["mountPath"] == "/etc/geobouncer"
    assert container["volumeMounts"][0]["readOnly"] is True
    # Listens on every address, on the port the probes and the Service use; no
    # Unix socket on the read-only root filesystem.
    assert cfg.pgbouncer.listen_addr == "*"
    assert cfg.pgbouncer.unix_socket_dir == ""
    port = container["ports"][0]
    assert port["containerPort"] == cfg.pgbouncer.listen_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == port["name"]
    assert manifests()["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert Path(cfg.resolve_path(cfg.pgbouncer.auth_file)).is_file()
    assert cfg.databases["app"].read_write_split is True


def test_the_configmap_routing_hook_loads_and_routes(tmp_path):
    ini = config_files(tmp_path)
    cfg = load_config(ini)
    hooks = Hooks.from_settings(cfg.pgbouncer, cfg.resolve_path)
    known = set(cfg.databases).__contains__
    assert hooks.route("app", "select * from reporting.daily", False, known) == "app_reporting"
    assert hooks.route("app", "select * from orders", False, known) is None
    assert hooks.route("app", "select * from reporting.daily", True, known) is None


def test_the_pod_runs_locked_down_and_drains_before_the_kill():
    spec = pod_spec()
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # preStop: wait for the endpoint removal, then SIGINT (safe shutdown) to PID 1,
    # geobouncer itself (the image's exec-form CMD), and wait for it to exit.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    script = command[-1]
    assert command[:2] == ["sh", "-c"]
    assert "kill -INT 1" in script and "kill -0 1" in script
    delay = int(next(e["value"] for e in container["env"] if e["name"] == "PRESTOP_DELAY"))
    assert '"$PRESTOP_DELAY"' in script
    assert spec["terminationGracePeriodSeconds"] >= delay + 30


# -- docker-compose.yml, deploy/docker/, Dockerfile ------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_has_a_primary_a_replica_and_geobouncer():
    services = compose()["services"]
    assert set(services) == {"primary", "replica", "geobouncer"}
    gb = services["geobouncer"]
    assert gb["build"] == "."
    assert gb["ports"] == ["6432:6432"]
    assert gb["depends_on"]["primary"]["condition"] == "service_healthy"
    assert gb["depends_on"]["replica"]["condition"] == "service_healthy"
    assert services["replica"]["depends_on"]["primary"]["condition"] == "service_healthy"
    for name in ("primary", "replica"):
        assert services[name]["image"].startswith("postgres:")
        assert "test" in services[name]["healthcheck"]


def test_compose_volumes_exist():
    doc = compose()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} not declared"
            assert target.startswith("/")


def test_compose_shell_escapes_its_variables():
    """Compose substitutes $VAR itself: the replica's script must say $$PGDATA."""
    script = compose()["services"]["replica"]["command"][0]
    assert "$$PGDATA" in script
    assert re.search(r"(?<!\$)\$PGDATA", script) is None
    assert "pg_basebackup" in script and " -R " in script


def test_compose_geobouncer_config_loads_and_names_the_services():
    doc = compose()
    mount = next(v for v in doc["services"]["geobouncer"]["volumes"]
                 if v.split(":")[1] == "/etc/geobouncer")
    cfg = load_config(ROOT / mount.split(":")[0] / "geobouncer.ini")
    assert cfg.pgbouncer.listen_addr == "*" and cfg.pgbouncer.listen_port == 6432
    assert cfg.pgbouncer.unix_socket_dir == ""
    hosts = {h for entry in cfg.databases.values() for h in entry.hosts}
    replicas = {r.split(":")[0] for e in cfg.databases.values() if e.replicas
                for r in e.replicas.split(",")}
    assert hosts | replicas <= set(doc["services"])
    assert replicas == {"replica"}
    # The userlist's role and password are the ones the postgres image creates.
    env = doc["services"]["primary"]["environment"]
    userlist = Path(cfg.resolve_path(cfg.pgbouncer.auth_file)).read_text(encoding="utf-8")
    assert f'"{env["POSTGRES_USER"]}" "{env["POSTGRES_PASSWORD"]}"' in userlist
    assert all(e.dbname in (None, env["POSTGRES_DB"]) for e in cfg.databases.values())
    # The replication role the replica streams with is made by the init script.
    init = (ROOT / "deploy" / "docker" / "primary-init.sh").read_text(encoding="utf-8")
    assert "REPLICATION LOGIN" in init and "host replication replicator" in init
    assert doc["services"]["replica"]["environment"]["PGPASSWORD"] == env["REPLICATION_PASSWORD"]


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_installs_only_the_runtime_dependencies():
    runs = " ".join(arg for op, arg in dockerfile() if op == "RUN")
    assert "pip install -c requirements.txt ." in runs   # setup.py's install_requires
    assert "-r requirements.txt" not in runs and "[test]" not in runs


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_a_mounted_config():
    ops = dict(dockerfile())
    assert ops["USER"].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in ops and "GEOBOUNCER_PORT" in ops["HEALTHCHECK"]
    cmd = shlex.split(ops["CMD"].strip("[]").replace(",", " "))
    assert cmd == ["geobouncer", "/etc/geobouncer/geobouncer.ini"]
    # The container's config directory is where compose mounts deploy/docker.
    targets = [v.split(":")[1] for v in compose()["services"]["geobouncer"]["volumes"]]
    assert str(Path(cmd[-1]).parent) in targets
    # The documented `docker run` joins the compose project's default network.
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"--network {compose()['name']}_default" in text
    assert '-v "$PWD/deploy/docker:/etc/geobouncer:ro"' in text


def test_dockerignore_keeps_what_the_image_copies():
    ignored = {line.strip().rstrip("/") for line in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    copied = {word for op, arg in dockerfile() if op == "COPY" for word in arg.split()[:-1]}
    assert copied == {"requirements.txt", "setup.py", "geobouncer"}
    assert not copied & ignored
    assert {".venv", ".git", "tests"} <= ignored
