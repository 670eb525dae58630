"""The cluster files as a platform team would launch them, checked without a cloud or a Kubernetes cluster:
ray_cluster.yaml against Ray's own autoscaler schema (and the checks `ray up` runs before launching), the KubeRay
manifests against the vendored KubeRay v1 CRD schema, the image's Dockerfile and lockfile, the MLflow server
script's syntax."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import render_cluster  # noqa: E402

KUBERAY = REPO / "infra" / "kuberay"
KUBE_EXAMPLE = {
    "CREMA_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/crema:0.1.0",
    "CREMA_BUCKET": "crema-data",
    "CREMA_RAW_BUCKET": "crema-raw",
    "CREMA_S3_ROLE_ARN": "arn:aws:iam::123456789012:role/crema-ray-s3",
}
STAGES = {"ingest", "pretrain", "probe"}


# ---- ray_cluster.yaml (AWS) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> dict:
    text = render_cluster.render(render_cluster.TEMPLATE.read_text(), render_cluster.values({}, example=True))
    return yaml.safe_load(text)


def test_cluster_yaml_validates_against_ray_schema(cluster):
    schema = json.loads((Path(__import__("ray").autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    prepared = render_cluster.validate(cluster)  # what `ray up` does before launching: defaults + validate_config
    assert set(prepared["available_node_types"]) == {"head", "cpu_ingest", "gpu_train"}


def test_ray_schema_catches_mistakes(cluster):
    broken = copy.deepcopy(cluster)
    broken["docker"]["pull_before_runs"] = True
    with pytest.raises(jsonschema.ValidationError):
        render_cluster.validate(broken)
    broken = copy.deepcopy(cluster)
    del broken["available_node_types"]["gpu_train"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        render_cluster.validate(broken)


def test_every_placeholder_is_documented():
    text = render_cluster.TEMPLATE.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    derived = {"CREMA_WHEEL_NAME"}
    for name in render_cluster.placeholders(text) - derived:
        assert f"export {name}=" in header or f" {name}=" in header, f"{name} is not explained in the header"
    assert render_cluster.placeholders(text) - derived <= set(render_cluster.EXAMPLE)


def test_render_refuses_unset_and_latest(tmp_path):
    with pytest.raises(render_cluster.RenderError, match="unset: .*CREMA_AMI_ID"):
        render_cluster.render(render_cluster.TEMPLATE.read_text(), render_cluster.values({}))
    env = dict(render_cluster.EXAMPLE, CREMA_IMAGE="123456789012.dkr.ecr.eu-west-1.amazonaws.com/crema:latest")
    with pytest.raises(render_cluster.RenderError, match="not :latest"):
        render_cluster.values(env)
    env = dict(render_cluster.EXAMPLE, CREMA_HEAD_PROFILE_ARN="crema-head")
    with pytest.raises(render_cluster.RenderError, match="CREMA_HEAD_PROFILE_ARN"):
        render_cluster.values(env)
    # The CLI: one clear line and exit 2 while variables are unset; the example renders.
    run = [sys.executable, str(REPO / "infra" / "render_cluster.py")]
    result = subprocess.run(run, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2 and "unset:" in result.stderr
    result = subprocess.run(run + ["--example", "-o", str(tmp_path / "c.yaml")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["cluster_name"] == "crema"


def test_cluster_nodes_images_roles_and_types(cluster):
    template = yaml.safe_load(render_cluster.TEMPLATE.read_text())
    assert template["docker"]["image"] == "${CREMA_IMAGE}"  # the registry image, a variable; no crema:latest
    assert cluster["docker"]["image"] == render_cluster.EXAMPLE["CREMA_IMAGE"]
    nodes = template["available_node_types"]
    for name, node in nodes.items():
        config = node["node_config"]
        assert config["ImageId"] == "${CREMA_AMI_ID}", name  # explicit AMI, never Ray's default
        expected = "${CREMA_HEAD_PROFILE_ARN}" if name == template["head_node_type"] else "${CREMA_WORKER_PROFILE_ARN}"
        assert config["IamInstanceProfile"] == {"Arn": expected}, name
        assert config["MetadataOptions"] == {"HttpTokens": "required"}, name
    assert nodes["cpu_ingest"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert re.match(r"(g5|g6|g6e|p4d|p4de|p5|p5e|p5en)\.", nodes["gpu_train"]["node_config"]["InstanceType"])
    assert "InstanceMarketOptions" not in nodes["gpu_train"]["node_config"]
    assert cluster["available_node_types"]["gpu_train"]["node_config"]["SubnetIds"] == \
        render_cluster.EXAMPLE["CREMA_SUBNET_IDS"].split(",")
    assert template["provider"]["use_internal_ips"] is True
    # The wheel is copied to the nodes and installed over the image's copy; the registry login precedes the pull.
    assert "${CREMA_WHEEL}" in template["file_mounts"].values()
    assert any("pip install" in c and "${CREMA_WHEEL_NAME}" in c for c in template["setup_commands"])
    assert any("docker login" in c for c in template["initialization_commands"])


def test_cluster_dashboard_private_with_token_auth(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    workers = " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in render_cluster.TEMPLATE.read_text()
    assert "~/.ray/auth_token" in cluster["file_mounts"]


# ---- infra/kuberay ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kuberay_schema() -> dict:
    schema = yaml.safe_load((KUBERAY / "schema" / "kuberay-v1.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def kube_docs(path: Path) -> list[dict]:
    text = path.read_text()
    unknown = set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(KUBE_EXAMPLE)
    assert not unknown, f"{path.name}: undocumented placeholders {unknown}"
    rendered = re.sub(r"\$\{([A-Z_]+)\}", lambda m: KUBE_EXAMPLE[m.group(1)], text)
    return [d for d in yaml.safe_load_all(rendered) if d]


def ray_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in kube_docs(p) if d["apiVersion"] == "ray.io/v1"]


def validate_kind(schema: dict, doc: dict) -> None:
    sub = {k: v for k, v in schema.items() if k != "oneOf"}
    sub["$ref"] = f"#/$defs/{doc['kind']}"
    jsonschema.Draft202012Validator(sub).validate(doc)


def test_kuberay_manifests_validate_against_crd_schema(kuberay_schema):
    docs = ray_docs()
    kinds = [d["kind"] for _, d in docs]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 3
    for name, doc in docs:
        validate_kind(kuberay_schema, doc)
        jsonschema.validate(doc, kuberay_schema)  # and through the top-level oneOf
    for path in KUBERAY.glob("*.yaml"):  # the plain Kubernetes objects parse and name themselves
        for doc in kube_docs(path):
            assert doc["metadata"]["name"] and doc.get("kind")


def test_crd_schema_catches_mistakes(kuberay_schema):
    _, job = next((n, d) for n, d in ray_docs() if d["kind"] == "RayJob")
    broken = copy.deepcopy(job)
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        validate_kind(kuberay_schema, broken)
    broken = copy.deepcopy(job)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate_kind(kuberay_schema, broken)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"] = "16 GB"
    with pytest.raises(jsonschema.ValidationError):
        validate_kind(kuberay_schema, broken)


def pod_specs(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def test_rayjobs_per_stage():
    jobs = {d["metadata"]["labels"]["crema.io/stage"]: d for _, d in ray_docs() if d["kind"] == "RayJob"}
    assert set(jobs) == STAGES
    for stage, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["entrypoint"].startswith(f"python -m crema.stages.{stage} ")
        assert importlib.util.find_spec(f"crema.stages.{stage}") is not None
        assert spec["backoffLimit"] >= 1
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(runtime_env) <= {"env_vars"}  # code comes from the image, not an uploaded working_dir
        # no secret in job metadata: the pseudonym key, S3 and MLflow credentials come from the pod's Secret
        for key in runtime_env.get("env_vars", {}):
            assert not re.search(r"KEY$|PASSWORD|SECRET|TOKEN", key), key
        submitter_env = {e["name"] for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= submitter_env
        groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
        if stage == "pretrain":
            assert "gpu" in groups and groups["gpu"]["minReplicas"] >= 1
            # a fixed run name: a retry or re-apply resumes the same run from its checkpoints
            assert re.search(r"\bname=crema-[a-z0-9-]+\b", spec["entrypoint"])
            assert "storage_path=s3://" in spec["entrypoint"]
        if stage == "ingest":
            assert set(groups) == {"cpu"}


def test_pods_gpu_tolerations_nonroot_and_token():
    for name, doc in ray_docs():
        cluster_spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert cluster_spec["rayVersion"] == __import__("ray").__version__
        assert cluster_spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        for group, pod in pod_specs(cluster_spec):
            assert pod["securityContext"]["runAsNonRoot"] is True, (name, group)
            container = pod["containers"][0]
            assert container["image"] == KUBE_EXAMPLE["CREMA_IMAGE"]
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            resources = container["resources"]
            if group == "gpu":
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            else:
                assert "nvidia.com/gpu" not in resources.get("limits", {})


# ---- the image, the lock, the MLflow server script ---------------------------------------------------------------

def lock_pins() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", text, re.M)}


def test_lockfile_pins_every_dependency_with_hashes():
    text = (REPO / "requirements.lock").read_text()
    requirements = [block for block in re.split(r"\n(?=[A-Za-z0-9])", text) if "==" in block.split("\n")[0]]
    assert len(requirements) > 50
    for block in requirements:
        assert "--hash=sha256:" in block, block.split()[0]
    pins = lock_pins()
    for name in ("torch", "ray", "mlflow", "psycopg", "psycopg-binary", "boto3", "flask-wtf"):
        assert name in pins, name
    assert pins["ray"] == __import__("ray").__version__


def test_dockerfile_builds_from_wheel_with_lock_as_non_root():
    text = (REPO / "infra" / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py311-(cu\d+)", text)
    assert base and base.group(1) == lock_pins()["ray"]
    assert "pip wheel" in text and "/tmp/dist/crema-*.whl" in text
    assert "--require-hashes" in text and "requirements.lock" in text
    assert "COPY configs /opt/crema/configs" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] == "ray"
    assert "-e ." not in text  # no editable install of a source tree
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text()
    assert "!requirements.lock" in ignore and "!configs/**" in ignore


def test_lockfile_holds_every_runtime_dependency_of_pyproject_at_an_allowed_version():
    """A dependency added to pyproject.toml (pyiceberg, say) without regenerating the lock would be missing from
    the image: the Dockerfile installs only the lock and the wheel with --no-deps."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {canonicalize_name(name): version for name, version in lock_pins().items()}
    header = (REPO / "requirements.lock").read_text().split("\n", 3)[:2]
    assert "-c constraints.txt" in header[1] and "--extra server" in header[1], header
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["server"]]]
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements.lock (regenerate it, see its header): {missing}"
    for requirement in wanted:
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned, prereleases=True), (str(requirement), pinned)
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            assert pins[canonicalize_name(name)] == version.strip(), line


def test_dockerfile_base_image_cuda_matches_the_locked_torch_build():
    """The Ray base image's CUDA tag and the CUDA runtime the locked torch wheel loads are one version, and the
    cluster's AMI comment names the driver that version needs."""
    pins = lock_pins()
    runtime = pins.get("nvidia-cuda-runtime") or pins.get("nvidia-cuda-runtime-cu12")
    assert runtime, "the lock holds no CUDA runtime wheel: a CPU-only torch would be in the GPU image"
    major, minor = runtime.split(".")[:2]
    tag = re.search(r"ARG RAY_IMAGE=rayproject/ray:[\d.]+-py311-cu(\d+)", (REPO / "infra" / "Dockerfile").read_text())
    assert tag and tag.group(1) == f"{major}{minor}", (tag and tag.group(1), runtime)
    cluster = (REPO / "ray_cluster.yaml").read_text()
    assert f"-py311-cu{major}{minor}" in cluster and f"CUDA {major}.{minor}" in cluster


def test_makefile_image_target():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^image:", makefile, re.M) and "infra/Dockerfile" in makefile
    result = subprocess.run(["make", "-s", "image-name", "REGISTRY=example.invalid/team"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"example.invalid/team/crema:{lock_version()}"


def lock_version() -> str:
    return re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_mlflow_server_script_is_valid_bash_and_private_by_default():
    script = REPO / "infra" / "mlflow-server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "--app-name basic-auth" in text and "--allowed-hosts" in text
    assert 'host=${MLFLOW_HOST:-127.0.0.1}' in text


def test_runbook_covers_the_stages_and_the_scale_plan():
    text = (REPO / "infra" / "README.md").read_text()
    for stage in STAGES:
        assert f"python -m crema.stages.{stage}" in text
    for step in ("## 1. Launch", "## 2. Submit", "## 3. Watch", "## 4. Resume", "## 5. Results in MLflow",
                 "## 6. Tear down", "## 7. Scale plan"):
        assert step in text
    # The scale plan's rate is the README's measured warm 1-CPU ingest rate, not a figure of its own.
    readme = (REPO / "README.md").read_text()
    warm = re.search(r"\| ingest, 1 CPU, Ray's start included / warm \| [\d,]+ / ([\d,]+) \|", readme).group(1)
    assert f"{warm} records/s per CPU core" in text and "not measured" in text and "120 KB" in text
    assert "pipelines" not in text


def ingest_settings(command: str):
    """(output, IngestConfig) of a documented `python -m crema.stages.ingest ...` command, loaded as the stage
    loads them (the image's /opt/crema/configs are this repository's configs/)."""
    import shlex

    from crema.config import IngestConfig, load_yaml, parse_overrides

    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    argv = argv[argv.index("crema.stages.ingest") + 1:]
    config = argv[argv.index("--config") + 1].replace("/opt/crema/configs/", "configs/")
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    return argv[argv.index("--output") + 1], load_yaml(REPO / config, IngestConfig, parse_overrides(overrides))


def test_documented_cluster_ingests_name_a_catalog_for_their_s3_output():
    """The embedded SQLite catalog is a file on the driver's node: an s3:// output without a `catalog` is a
    config error, so every documented cluster ingest names one (and its warehouse on S3)."""
    job = next(d for _, d in ray_docs() if d["kind"] == "RayJob" and d["metadata"]["labels"]["crema.io/stage"] == "ingest")
    readme = (REPO / "README.md").read_text()
    runbook = (REPO / "infra" / "README.md").read_text()
    commands = [job["spec"]["entrypoint"]] + [
        block for text in (readme, runbook) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        if "crema.stages.ingest" in block and "s3://" in block.split("crema.stages.ingest", 1)[1]]
    assert len(commands) >= 3, commands
    for command in commands:
        command = command[command.index("python -m crema.stages.ingest"):].split("\n\n")[0]
        output, cfg = ingest_settings(command)
        assert output.startswith("s3://") and cfg.catalog is not None, command
        assert cfg.catalog.type in ("glue", "rest") and (cfg.catalog.warehouse or "").startswith("s3://"), command
