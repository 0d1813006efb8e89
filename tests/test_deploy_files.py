"""Deployment files: they parse, use only the keys Ray and KubeRay document, validate against Ray's
own schemas, and agree with pyproject.toml and the presets. Fast: no Ray cluster is started."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "cluster.yaml"
FAKE = "cluster-fake.yaml"
RAYJOB = "k8s/rayjob-train.yaml"
RAYSERVICE = "k8s/rayservice-serve.yaml"
RUNTIME_ENV = "jobs/runtime_env.yaml"
ALL_FILES = [CLUSTER, FAKE, RAYJOB, RAYSERVICE, RUNTIME_ENV]

# Top-level keys of the cluster launcher YAML, from "Cluster YAML Configuration Options"
# (docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html).
CLUSTER_KEYS = {
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "docker", "provider",
    "auth", "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands",
}
NODE_TYPE_KEYS = {"node_config", "resources", "min_workers", "max_workers", "worker_setup_commands",
                  "docker", "labels", "initialization_commands", "idle_timeout_s", "priority"}
FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True}
# Every key of Ray's fake_multi_node/example.yaml: the autoscaler reads a fake_multinode config as is
# (the wheel ships no defaults for it), so all of them must be spelled out.
FAKE_EXAMPLE_KEYS = {
    "cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "auth",
    "upscaling_speed", "idle_timeout_minutes", "docker", "initialization_commands", "setup_commands",
    "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
    "file_mounts", "cluster_synced_files", "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter",
}

# runtime_env fields Ray documents (ray.runtime_env.RuntimeEnv, "Environment Dependencies").
RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda",
                      "env_vars", "container", "image_uri", "config", "nsight",
                      "worker_process_setup_hook", "java_jars"}

# KubeRay ray.io/v1 fields (ray-operator/apis/ray/v1/*_types.go, and the CRD API reference).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
               "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "serveService"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}

# Files of the package that a job's working_dir upload must carry.
MUST_UPLOAD = ["pyproject.toml", "ft_ray/__init__.py", "ft_ray/data/__init__.py", "ft_ray/train/trainer.py",
               "jobs/train.py", "jobs/configs/smoke.yaml", "serve_apps/app.py", "tune_spaces"]


def load(rel: str):
    return yaml.safe_load((ROOT / rel).read_text())


def load_docs(rel: str) -> dict[str, dict]:
    """A multi-document manifest as {kind: document}."""
    docs = [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{rel}: one document per kind, got {kinds}"
    return {d["kind"]: d for d in docs}


def dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def pin(name: str) -> str:
    """pyproject's requirement string for a distribution, e.g. 'torch>=2.6,<2.14'."""
    (req,) = [d for d in dependencies() if re.match(rf"{name}\b(?![-_])", d)]
    return req


def deps_without_ray() -> list[str]:
    """What a runtime env installs: everything but Ray, which the cluster already runs."""
    return [d for d in dependencies() if not d.startswith("ray")]


def ray_schema() -> dict:
    import json

    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"Ray ships its cluster config schema at {path}"
    return json.loads(path.read_text())


def commands(cfg: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in cfg.get(k) or []]


def kv_tokens(cmds: list[str]) -> list[str]:
    return [tok for c in cmds for part in c.split("&&") for tok in shlex.split(part)]


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("rel", ALL_FILES)
def test_file_parses_as_yaml(rel):
    docs = [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_keys_and_node_types():
    cfg = load(CLUSTER)
    assert set(cfg) <= CLUSTER_KEYS, f"undocumented keys: {set(cfg) - CLUSTER_KEYS}"
    for key in ("cluster_name", "max_workers", "idle_timeout_minutes", "provider", "auth",
                "available_node_types", "head_node_type", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, nt in types.items():
        assert set(nt) <= NODE_TYPE_KEYS, (name, set(nt) - NODE_TYPE_KEYS)
        assert isinstance(nt["min_workers"], int) and isinstance(nt["max_workers"], int), name
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= cfg["max_workers"], name
        assert nt["node_config"].get("InstanceType"), name
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU", 0) <= 1, "no training on the head"
    gpu = [nt for n, nt in types.items() if n != cfg["head_node_type"] and nt["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1, "one GPU worker type"
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 2, "autoscales from 0"
    assert sum(nt["min_workers"] for nt in types.values()) <= cfg["max_workers"]


def test_cluster_yaml_installs_ft_ray_with_pyproject_pins():
    cfg = load(CLUSTER)
    setup = commands(cfg, "initialization_commands", "setup_commands", "head_setup_commands",
                     "worker_setup_commands")
    tokens = kv_tokens(setup)
    for name in ("torch", "ray"):
        assert pin(name) in tokens, f"setup must install {pin(name)!r} (pyproject's pin)"
    assert [t for t in tokens if t.startswith("torch")] == [pin("torch")], "no other torch spec"
    assert "/home/ubuntu/ft-ray[dev]" in tokens and "-e" in tokens, "editable install of the synced repo"
    assert cfg["file_mounts"]["/home/ubuntu/ft-ray"] in (".", "./"), "the repo is synced from the cwd"
    assert "boto3" in kv_tokens(commands(cfg, "head_setup_commands")), "the AWS autoscaler needs boto3"


def test_cluster_yaml_shared_storage_matches_gpu_presets():
    cfg = load(CLUSTER)
    setup = " ".join(commands(cfg, "initialization_commands", "setup_commands"))
    assert re.search(r"mount .* /shared\b", setup), "every node mounts the shared storage at /shared"
    for preset in ("gpu-125m", "gpu-1b"):
        p = load(f"jobs/configs/{preset}.yaml")
        assert p["train"]["storage_path"].startswith("/shared/"), preset
        assert p["data"]["path"].startswith("/shared/"), preset


def test_cluster_yaml_start_commands():
    cfg = load(CLUSTER)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    # both start from the venv the setup commands built, with the same authentication mode
    for cmd in (head, worker):
        assert "ft-venv/bin" in cmd and "RAY_AUTH_MODE=token" in cmd
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"], "the token reaches every node"


# ---------------------------------------------------------------- cluster-fake.yaml


def test_cluster_fake_uses_fake_multinode_provider():
    cfg = load(FAKE)
    real = load(CLUSTER)
    assert cfg["provider"] == FAKE_PROVIDER
    assert set(cfg) == FAKE_EXAMPLE_KEYS, "every key of Ray's example.yaml, nothing else"
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    assert cfg["head_node_type"] == FAKE_HEAD_NODE_TYPE, "the fake provider names the head's type"
    types = cfg["available_node_types"]
    assert set(types) == set(real["available_node_types"]), "the node types of cluster.yaml"
    assert cfg["head_node_type"] in types and cfg["idle_timeout_minutes"] == 1
    head = types[cfg["head_node_type"]]
    smoke = load("jobs/configs/smoke.yaml")["train"]
    assert head["resources"]["CPU"] < smoke["num_workers"], "the head cannot run the 2-worker job"
    assert head["max_workers"] == 0
    (worker,) = [nt for n, nt in types.items() if n != cfg["head_node_type"]]
    assert worker["resources"] == {"CPU": 2}, "fake workers: logical CPUs, no GPU"
    assert worker["min_workers"] == 0 and worker["max_workers"] == 2 <= cfg["max_workers"]


# ---------------------------------------------------------------- Ray's schema and checks


@pytest.mark.parametrize("rel", [CLUSTER, FAKE])
def test_cluster_configs_validate_against_ray_schema(rel):
    schema = ray_schema()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(load(rel), schema)


def test_cluster_yaml_passes_ray_up_checks():
    """What `ray up` runs before it contacts the cloud: defaults merged, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    pytest.importorskip("jsonschema")  # validate_config needs it, as `ray up` does
    validate_config(prepare_config(copy.deepcopy(load(CLUSTER))))


def test_cluster_fake_passes_autoscaler_checks():
    """The autoscaler validates the fake config as read (no defaults exist for this provider)."""
    from ray.autoscaler._private.util import validate_config

    pytest.importorskip("jsonschema")
    validate_config(copy.deepcopy(load(FAKE)))


# ---------------------------------------------------------------- KubeRay


def check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, (where, set(spec) - RAYCLUSTER_SPEC)
    assert spec["enableInTreeAutoscaling"] is True, where
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, where
    auth = spec.get("authOptions", {})
    assert set(auth) <= AUTH_OPTIONS and auth.get("mode", "token") in ("token", "disabled"), where
    ray_version = spec["rayVersion"]
    assert re.fullmatch(pin("ray").split("==")[1].replace(".", r"\.").replace("*", r"\d+"), ray_version), \
        f"{where}: rayVersion {ray_version} vs pyproject {pin('ray')}"
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, (where, set(head) - HEAD_GROUP)
    groups = [("head", head)]
    assert spec["workerGroupSpecs"], where
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP, (where, set(g) - WORKER_GROUP)
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, (where, key)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where
        groups.append((g["groupName"], g))
    for name, g in groups:
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{where}/{name}: rayStartParams are strings"
        containers = g["template"]["spec"]["containers"]
        assert containers, (where, name)
        for c in containers:
            assert c["image"].startswith(f"rayproject/ray:{ray_version}-py311-"), (where, name, c["image"])


def check_runtime_env(env: dict, where: str) -> None:
    assert set(env) <= RUNTIME_ENV_FIELDS, (where, set(env) - RUNTIME_ENV_FIELDS)
    assert re.match(r"(https|s3|gs)://", env["working_dir"]), f"{where}: working_dir must be a remote URI"
    pip = env["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert packages == deps_without_ray(), f"{where}: pip must be pyproject's dependencies minus ray"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation (remote working_dir scheme, pip fields)


def check_shared_volume(docs: dict, spec: dict, where: str) -> None:
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every pod mounts the claim"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        pod = g["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert claims.get(mounts.get("/shared")) == claim["metadata"]["name"], f"{where}: /shared on every pod"


def test_rayjob_manifest():
    docs = load_docs(RAYJOB)
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["entrypoint"] == "python -m jobs.train --config gpu-125m"
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), "RayJob.runtimeEnvYAML")
    check_shared_volume(docs, spec["rayClusterSpec"], "RayJob")
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "no training on the head"
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 2, "GPU workers autoscale from 0"
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic notices from importing Ray Serve
def test_rayservice_manifest():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    docs = load_docs(RAYSERVICE)
    svc = docs["RayService"]
    assert svc["apiVersion"] == "ray.io/v1" and svc["metadata"]["name"]
    spec = svc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, set(spec) - RAYSERVICE_SPEC
    check_cluster_spec(spec["rayClusterConfig"], "RayService")
    check_shared_volume(docs, spec["rayClusterConfig"], "RayService")
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own config-file schema
    assert set(serve_cfg) <= set(ServeDeploySchema.model_fields)
    (app,) = serve_cfg["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "serve_apps.app:app" and app["args"]["models_dir"].startswith("/shared/")
    check_runtime_env(app["runtime_env"], "RayService app runtime_env")
    local = {d["name"] for a in load("serve_apps/config.yaml")["applications"] for d in a["deployments"]}
    for dep in app["deployments"]:
        assert set(dep) <= set(DeploymentSchema.model_fields), set(dep) - set(DeploymentSchema.model_fields)
        assert dep["name"] in local, "deployment names are the app's (see serve_apps/config.yaml)"
        auto = dep["autoscaling_config"]
        assert set(auto) <= set(AutoscalingConfig.model_fields)
        assert 1 <= auto["min_replicas"] < auto["max_replicas"]


def test_both_manifests_declare_the_same_claim():
    assert load_docs(RAYJOB)["PersistentVolumeClaim"] == load_docs(RAYSERVICE)["PersistentVolumeClaim"]


# ---------------------------------------------------------------- jobs/runtime_env.yaml


def test_documented_runtime_env_fields_are_ray_fields():
    from ray.runtime_env import RuntimeEnv

    assert RUNTIME_ENV_FIELDS <= {f.lstrip("_") for f in RuntimeEnv.known_fields}


def test_runtime_env_file(monkeypatch):
    env = load(RUNTIME_ENV)
    assert set(env) <= RUNTIME_ENV_FIELDS, set(env) - RUNTIME_ENV_FIELDS
    assert env["working_dir"] == "."
    assert env["pip"] == deps_without_ray(), "pyproject's dependencies minus ray"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values are strings"
    assert env["env_vars"]["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] == "0"
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)  # working_dir "." is the repo root, as for `ray job submit` from there
    RuntimeEnv(**env)  # Ray's own validation of every field


def test_runtime_env_excludes_what_they_should_and_nothing_else():
    """Matched with Ray's own .gitignore-style matcher for working_dir excludes."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(ROOT, load(RUNTIME_ENV)["excludes"])
    for rel in (".venv", ".venv/bin/python", "runs", "runs/smoke/config.yaml", "data", "results", ".git",
                "ft_ray/__pycache__", "ft_ray.egg-info"):
        assert excluded(ROOT / rel), f"{rel} must not be uploaded"
    for rel in MUST_UPLOAD:
        assert (ROOT / rel).exists(), rel
        assert not excluded(ROOT / rel), f"{rel} must be uploaded"
