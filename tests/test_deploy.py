"""The deployment examples in deploy/, validated and checked against the code and image.

cfn-lint and kubernetes-validate (the ``deploy`` extra; ``make image-test`` installs it)
validate with the schemas they ship: the network is refused while they run. Then every
port, path, env name, credential file, user and command the examples name is checked
against what the code and the Containerfile really use, and the IAM policy against the
boto3 calls in the code.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from callback_server import cli as cb_cli
from callback_server import settings as cb_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "cloudformation" / "callback-server.yaml"
MANIFESTS = DEPLOY / "kubernetes" / "callback-server.yaml"
POLICY = DEPLOY / "iam" / "callback-server-task-policy.json"
#: The Kubernetes kind running the replicas: stable pod names are stable MQTT client ids.
WORKLOAD = "StatefulSet"
SOURCES = [p for pkg in ("bridge", "edge_agent", "callback_server")
           for p in (ROOT / pkg).rglob("*.py")]

# --- reading the examples and the image ------------------------------------------------

class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (``!Ref``, ``!Sub``, ...) kept as data."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {f"Fn::{suffix}" if suffix != "Ref" else "Ref": value}


_CfnLoader.add_multi_constructor("!", _tag)


def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # type: ignore[no-any-return]


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def manifest(kind: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind)


def containerfile() -> dict[str, Any]:
    """The final stage's instructions that deploy/ depends on."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    user = re.search(r"^USER (\S+)", final, re.M)
    expose = re.search(r"^EXPOSE (.+)$", final, re.M)
    assert user and expose
    return {"env": env, "user": user.group(1), "ports": {int(p) for p in expose.group(1).split()}}


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def container_definition() -> dict[str, Any]:
    task = template()["Resources"]["TaskDefinition"]["Properties"]
    return task["ContainerDefinitions"][0]  # type: ignore[no-any-return]


def cfn_env_names() -> set[str]:
    names = set()
    for item in walk(container_definition()):
        if isinstance(item, dict) and set(item) >= {"Name"} and (
                "Value" in item or "ValueFrom" in item):
            names.add(item["Name"])
    return names


def k8s_env_names() -> set[str]:
    container = manifest(WORKLOAD)["spec"]["template"]["spec"]["containers"][0]
    return set(manifest("ConfigMap")["data"]) | {e["name"] for e in container["env"]}


def string_constants() -> set[str]:
    found: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def honoured_env_names() -> set[str]:
    """What the services read: their settings' env maps, and names the code spells out
    (the config file variables, CREDENTIALS_DIRECTORY, FORWARDED_ALLOW_IPS, ...)."""
    names = set(cb_config.ENV_MAP)
    return names | {s for s in string_constants() if re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", s)}


def assert_known(missing: set[str]) -> None:
    assert not missing, f"deploy/ names what the code does not have: {sorted(missing)}"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: the validators must work offline."""
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"network used: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a))  # type: ignore[arg-type]


# --- validators ----------------------------------------------------------------------

def test_cloudformation_template_passes_cfn_lint_offline(no_network: None) -> None:
    api = pytest.importorskip("cfnlint.api", reason="pip install '.[deploy]'")
    matches = api.lint_file(TEMPLATE, api.ManualArgs(regions=["us-east-1", "eu-west-1"]))
    assert not matches, "\n".join(str(m) for m in matches)


def test_cloudformation_lint_catches_a_mistake(tmp_path: Path, no_network: None) -> None:
    """The validator really reads the template (a misspelt property fails it)."""
    api = pytest.importorskip("cfnlint.api", reason="pip install '.[deploy]'")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEMPLATE.read_text().replace("StopTimeout:", "StopTimeot:"))
    assert any("StopTimeot" in str(m) for m in api.lint_file(bad, api.ManualArgs()))


@pytest.mark.parametrize("version", ["1.28.0", "1.33.0"])
def test_kubernetes_manifests_pass_kubernetes_validate_offline(
        version: str, no_network: None) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install '.[deploy]'")
    kinds = []
    for doc in manifests():
        kv.validate(doc, version, strict=True)  # raises on any error
        kinds.append(doc["kind"])
    assert kinds == ["ConfigMap", WORKLOAD, "Service", "PodDisruptionBudget"]
    broken = manifest(WORKLOAD)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


# --- the examples against the image and the code -----------------------------------------

def test_examples_use_the_images_port_user_command_and_health_check() -> None:
    image = containerfile()
    port = cb_config.CallbackSettings.model_fields["http_port"].default
    assert port in image["ports"]
    ctr = container_definition()
    resources = template()["Resources"]
    assert ctr["PortMappings"][0]["ContainerPort"] == port
    assert {"Name": "CALLBACK_HTTP_PORT", "Value": str(port)} in ctr["Environment"]
    assert resources["TargetGroup"]["Properties"]["Port"] == port
    assert resources["ServiceSecurityGroup"]["Properties"]["SecurityGroupIngress"][0][
        "FromPort"] == port
    assert ctr["User"] == image["user"]
    assert ctr["Command"] == ["callback-server", "run"]
    assert ctr["HealthCheck"]["Command"] == ["CMD", "callback-server", "probe"]
    # ECS's default stop timeout is 30 s; the ALB stops sending before the task stops
    deregister = int(resources["TargetGroup"]["Properties"]["TargetGroupAttributes"][0]["Value"])
    assert deregister < ctr["StopTimeout"] <= 30

    deployment = manifest(WORKLOAD)["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert container["ports"][0]["containerPort"] == port
    assert f'{deployment["securityContext"]["runAsUser"]}:' \
           f'{deployment["securityContext"]["runAsGroup"]}' == image["user"]
    assert container["args"] == ["callback-server", "run"]
    assert deployment["terminationGracePeriodSeconds"] <= 30
    # the commands exist: argparse answers --help with 0 for a known subcommand only
    for sub in ("run", "probe", "migrate", "check-config"):
        with pytest.raises(SystemExit) as done:
            cb_cli.main([sub, "--help"])
        assert done.value.code == 0


def test_health_checks_ask_readiness_where_the_service_answers_it() -> None:
    assert cb_cli.HEALTH_READY == "/callback/health?ready=1"
    target = template()["Resources"]["TargetGroup"]["Properties"]
    assert target["HealthCheckPath"] == cb_cli.HEALTH_READY
    container = manifest(WORKLOAD)["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == cb_cli.HEALTH_READY
    assert container["livenessProbe"]["httpGet"]["path"] == "/callback/health"
    assert container["readinessProbe"]["httpGet"]["port"] == container["ports"][0]["name"]


async def test_public_paths_are_routes_of_the_callback_server(tmp_path: Path) -> None:
    from callback_server.service import CallbackServer

    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "CALLBACK_TOKEN": "t"})
    rule = template()["Resources"]["IngestRule"]["Properties"]
    public = set(rule["Conditions"][0]["PathPatternConfig"]["Values"])
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
        routes = set(server.app.openapi()["paths"])
        # a route outside the OpenAPI document (the confirmation's trailing slash) is one
        # if it answers: not 404, nor a redirect to another path
        for path in public - routes:
            answers = {(await client.request(m, path)).status_code for m in ("GET", "POST")}
            if answers - {404, 307}:
                routes.add(path)
    assert "/callback/messages" in public and "/callback/health" in routes
    assert_known(public - routes)


def test_env_names_and_credential_files_are_the_ones_the_code_reads() -> None:
    image = containerfile()
    honoured = honoured_env_names()
    assert {"CALLBACK_SERVER_CONFIG", "CREDENTIALS_DIRECTORY"} <= set(image["env"])
    assert set(image["env"]) <= honoured | {"PATH", "PYTHONUNBUFFERED",
                                            "PYTHONDONTWRITEBYTECODE"}
    # Kubernetes mounts the credential files where the image looks for them
    deployment = manifest(WORKLOAD)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in deployment["containers"][0]["volumeMounts"]}
    assert mounts["credentials"] == image["env"]["CREDENTIALS_DIRECTORY"]
    from bridge.service.settings_loader import CREDENTIALS as SHARED

    files = {i["path"] for i in deployment["volumes"][0]["secret"]["items"]}
    named_by_env = {Path(v).name for v in manifest("ConfigMap")["data"].values()
                    if v.startswith(mounts["credentials"] + "/")}
    assert files <= set(SHARED) | set(cb_config.CREDENTIALS) | named_by_env, files
    assert_known((cfn_env_names() | k8s_env_names()) - honoured)


# --- IAM -----------------------------------------------------------------------------

def boto3_actions() -> set[str]:
    """``service:Operation`` for every boto3 client call in the code, by botocore's model."""
    clients: set[str] = set()
    calls: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        if "boto3" not in text and "botocore" not in text:
            continue
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls.add(node.func.attr)
                if node.func.attr == "client" and node.args and isinstance(
                        node.args[0], ast.Constant):
                    clients.add(str(node.args[0].value))
    if not clients:
        return set()
    session = pytest.importorskip("botocore.session").get_session()
    found = set()
    for service in clients:
        model = session.get_service_model(service)
        prefix = model.signing_name or model.endpoint_prefix
        found |= {f"{prefix}:{operation}" for operation in model.operation_names
                  if _snake(operation) in calls}
    return found


def _snake(operation: str) -> str:
    """botocore's own operation -> method name (GetSecretValue -> get_secret_value)."""
    return str(pytest.importorskip("botocore").xform_name(operation))


def policy_actions(document: dict[str, Any]) -> set[str]:
    actions: set[str] = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        value = statement["Action"]
        actions |= {value} if isinstance(value, str) else set(value)
    return actions


def test_task_policy_grants_exactly_the_aws_calls_the_code_makes() -> None:
    policy = json.loads(POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    granted = policy_actions(policy)
    assert not [a for a in granted if "*" in a]
    assert all(s["Resource"] != "*" for s in policy["Statement"])
    # the template's task role carries the same policy
    with_name, without = template()["Resources"]["TaskRole"]["Properties"]["Policies"][
        "Fn::If"][1:]
    assert without == {"Ref": "AWS::NoValue"}  # the password from ECS: no calls of its own
    role = with_name[0]["PolicyDocument"]
    assert policy_actions(role) == granted
    called = boto3_actions()
    assert called, "the code makes no boto3 call: the policy test would compare nothing"
    assert granted == called


# --- what the examples ask of the image and the service, decided as AWS would --------------

_NO_VALUE = object()


def _resolve(node: Any, conditions: dict[str, bool], parameters: dict[str, str]) -> Any:
    """``node`` with the template's conditions decided: ``Fn::If`` picks its branch,
    ``AWS::NoValue`` drops out, a parameter's ``Ref`` is its value."""
    if isinstance(node, list):
        values = [_resolve(v, conditions, parameters) for v in node]
        return [v for v in values if v is not _NO_VALUE]
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            name, yes, no = node["Fn::If"]
            return _resolve(yes if conditions[name] else no, conditions, parameters)
        if set(node) == {"Ref"}:
            if node["Ref"] == "AWS::NoValue":
                return _NO_VALUE
            return parameters.get(node["Ref"], node)
        items = {k: _resolve(v, conditions, parameters) for k, v in node.items()}
        return {k: v for k, v in items.items() if v is not _NO_VALUE}
    return node


def _condition(node: Any, conditions: dict[str, Any], parameters: dict[str, str]) -> bool:
    (kind, args), = node.items()
    if kind == "Fn::Equals":
        a, b = (_resolve(x, {}, parameters) for x in args)
        return bool(a == b)
    if kind == "Fn::Not":
        return not _condition(args[0], conditions, parameters)
    if kind == "Condition":
        return _condition(conditions[args], conditions, parameters)
    raise AssertionError(f"condition {kind} not understood by this test")


def task_environment(**given: str) -> dict[str, str]:
    """The callback server's environment in the ECS task the template makes from the
    parameters ``given`` (the rest at their defaults); ECS's ``secrets`` are left out."""
    doc = template()
    parameters = {name: str(spec.get("Default", "")) for name, spec in
                  doc["Parameters"].items()}
    parameters.update(given, **{"AWS::Region": "eu-west-1"})
    conditions = {name: _condition(node, doc["Conditions"], parameters)
                  for name, node in doc["Conditions"].items()}
    ctr = _resolve(container_definition(), conditions, parameters)
    return {e["Name"]: e["Value"] for e in ctr["Environment"]}


def image_extras() -> set[str]:
    """The extras the image installs unless told otherwise (the build's ARG EXTRAS)."""
    found = re.search(r"^ARG EXTRAS=(\S+)$", (ROOT / "Containerfile").read_text(), re.M)
    assert found, "the Containerfile states no default EXTRAS"
    return set(found.group(1).split(","))


def backends_named_in_deploy() -> set[str]:
    default = cb_config.CallbackSettings.model_fields["mqtt_backend"].default
    named = {manifest("ConfigMap")["data"].get("MQTT_BACKEND", default)}
    for url in ("", "mqtts://broker.example:8883"):
        named.add(task_environment(MqttUrl=url).get("MQTT_BACKEND", default))
    return named


def extra_needed(backend: str, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The extra the code says ``backend`` needs: what building its transport answers
    when no optional package (awscrt, awsiotsdk) can be imported."""
    import sys

    from bridge.errors import ConfigError
    from bridge.transport import create_transport
    from callback_server.service import mqtt_settings

    optional = ("awscrt", "awsiot")
    for name in list(sys.modules):
        if name.split(".")[0] in optional or name in ("bridge.transport.crt",
                                                      "bridge.transport.awsiot"):
            monkeypatch.delitem(sys.modules, name)
    for name in optional:
        monkeypatch.setitem(sys.modules, name, None)  # `import awscrt` raises ImportError
    settings = cb_config.load(None, {"MQTT_URL": "mqtts://broker.example:8883",
                                     "MQTT_BACKEND": backend})
    try:
        create_transport(backend, mqtt_settings(settings))
    except ConfigError as exc:
        found = re.search(r"needs the (\w+) extra", str(exc))
        assert found, exc
        return found.group(1)
    return None


def test_every_mqtt_backend_deploy_names_runs_on_the_images_default_extras(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` refuses a backend whose extra is not installed: pods would restart in a loop."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    named = backends_named_in_deploy()
    assert "awsiot" in named and "memory" in named, named  # the examples as written
    needs = {backend: extra_needed(backend, monkeypatch) for backend in named}
    assert needs["awsiot"] == "awsiot", needs  # the check sees a missing extra
    missing = {b: extra for b, extra in needs.items()
               if extra is not None and extra not in image_extras()}
    assert not missing, f"deploy/ names backends the image cannot run: {missing}"
    assert image_extras() <= extras


async def test_without_a_broker_the_template_runs_healthy_on_http_ingest(
        tmp_path: Path) -> None:
    """MqttUrl empty: the in-process broker stands in, `run` accepts it, and health is
    healthy (the default mqtt://127.0.0.1:1883 would leave it degraded for good)."""
    from callback_server import config_checks
    from callback_server.service import CallbackServer

    env = task_environment(MqttUrl="")
    assert env.get("MQTT_BACKEND") == "memory", env
    assert "MQTT_URL" not in env and "SHARE_GROUP" not in env
    env.pop("DATABASE_SECRET_NAME", None)
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'cb.db'}",
               # ECS's secrets: the template always hands these two over
               CALLBACK_CODES="pudu-code=acme", CALLBACK_TOKEN="rule-token")
    settings = cb_config.load(None, env)
    assert config_checks.problems(settings) == []  # what `run` checks before it starts
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
        r = await client.get("/callback/health?strict=1")
        assert r.status_code == 200 and r.json()["status"] == "healthy", r.text

    with_broker = task_environment(MqttUrl="mqtts://broker.example:8883")
    assert "MQTT_BACKEND" not in with_broker and with_broker["SHARE_GROUP"] == "ingest"


def test_each_kubernetes_replica_keeps_its_mqtt_client_id_across_restarts() -> None:
    """A StatefulSet's pod names (callback-server-0, -1) come back after a restart or an
    update; a Deployment's are new each time, and each old broker session would stay
    subscribed to the shared stream, taking its share."""
    workload = manifest(WORKLOAD)
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["serviceName"] == manifest("Service")["metadata"]["name"]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    client_id = next(e for e in container["env"] if e["name"] == "MQTT_CLIENT_ID")
    assert client_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_kubernetes_service_keeps_a_client_on_one_replica() -> None:
    """Console sign-ins live in the replica that made them."""
    assert manifest("Service")["spec"]["sessionAffinity"] == "ClientIP"
