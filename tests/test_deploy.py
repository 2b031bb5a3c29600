"""The deploy/ files, checked as far as this machine can: the RayJob manifest against
KubeRay v1.7.0's RayJob schema (read from ../shared/kuberay, every key the manifest uses
listed there: Kubernetes drops a misspelt one silently), the cluster launcher file
against the schema inside the installed Ray wheel, the Dockerfile's base image and pins
against requirements.txt, and each file's tune_main.py command parsed as tune_main.py
parses it. Neither Kubernetes nor a Docker engine runs here: nothing is applied or built."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

import tune_main
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
KUBERAY = REPO.parent / "shared" / "kuberay" / "ray.io_rayjobs.v1.7.0.yaml"


def pins() -> dict[str, str]:
    """requirements.txt's pins: package (extras dropped, lower case) -> version."""
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s#]+)", line):
            found[match[1].lower()] = match[3]
    return found


def rayjob_schema() -> dict:
    doc = yaml.load(KUBERAY.read_text(), Loader=yaml.CSafeLoader)  # libyaml: 1.4 MB in a moment
    return next(v for v in doc["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unlisted(doc, schema: dict, where: str = "") -> list[str]:
    """Keys of `doc` its schema does not list (where the schema lists properties and
    neither allows others nor preserves unknown fields)."""
    found = []
    if isinstance(doc, dict) and "properties" in schema:
        open_ = schema.get("additionalProperties") or schema.get("x-kubernetes-preserve-unknown-fields")
        for key, value in doc.items():
            if key in schema["properties"]:
                found += unlisted(value, schema["properties"][key], f"{where}.{key}")
            elif not open_:
                found.append(f"{where}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += unlisted(item, schema["items"], f"{where}[{i}]")
    return found


def rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def test_the_rayjob_is_valid_under_kuberays_schema_with_no_key_it_does_not_list():
    manifest, schema = rayjob(), rayjob_schema()
    jsonschema.validate(manifest, schema)
    assert unlisted(manifest, schema) == []
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert unlisted(misspelt, schema) == [".spec.shutdownAfterJobFinish"]  # the check catches one


def test_the_rayjob_runs_the_main_job_from_a_bucket_on_gpu_workers_and_retries_into_it():
    spec = rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/genre-ray/tune_main.py"]
    cfg, session = tune_main.parse(argv[2:])
    assert cfg.run.storage_path.startswith("s3://") and session.name  # a retry finds the run
    assert cfg.resources.gpus_per_trial > 0
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["rayClusterSpec"]["rayVersion"] == pins()["ray"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30  # time for the driver to save on a stop
    head = spec["rayClusterSpec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    key = next(e for e in container["env"] if e["name"] == "WANDB_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == "wandb" and "value" not in key
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
               for g in workers)


def cluster() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_the_cluster_file_is_valid_under_the_schema_ray_ships():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = cluster()
    jsonschema.validate(config, schema)
    broken = {**config, "available_node_types": {"head": {"node_config": {}}}}
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, schema)  # the schema does check node types


def test_the_cluster_file_has_a_head_without_gpus_and_gpu_workers():
    config = cluster()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for name, t in types.items()
               if name != config["head_node_type"])


def test_the_cluster_files_submit_command_parses_as_tune_main_does():
    text = (DEPLOY / "cluster.yaml").read_text()
    lines = [line.lstrip("#").strip().rstrip("\\").strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    command = " ".join(lines[start:start + 3])
    argv = shlex.split(command.split(" -- ", 1)[1])
    assert argv[:2] == ["python", "tune_main.py"]
    cfg, session = tune_main.parse(argv[2:])
    assert cfg.run.storage_path.startswith("s3://") and session.name


def test_the_dockerfile_builds_on_rays_image_of_the_pinned_ray_and_installs_the_pins():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)[1]
    version, python, accelerator = base.split("-")
    assert (version, python, accelerator) == (pins()["ray"], "py311", "gpu")
    assert re.search(r"^RUN pip install --no-cache-dir -r requirements\.txt$", text, re.M)
    assert not re.search(r"==", text.replace("requirements.txt", ""))  # no pin of its own
    for path in ("genre_ray", "search_spaces", "tune_main.py"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert (REPO / path).exists()
