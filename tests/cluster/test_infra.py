"""The deployment files in `infra/` are parsed and checked against the repository, so a renamed
command, config or Dockerfile breaks a test instead of a user's first cluster job."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from stiv.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))
RAY_PIN = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _subcommands() -> dict[str, set[str]]:
    """stiv subcommand -> its option strings, read from the real parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {
        name: {opt for action in p._actions for opt in action.option_strings}
        for name, p in sub.choices.items()
    }


def _check_stiv_command(command: str) -> None:
    """A `stiv ...` command line names a real subcommand, real options and existing configs."""
    argv = shlex.split(command)
    assert argv[0] == "stiv", command
    options = _subcommands()
    assert argv[1] in options, f"unknown subcommand in {command!r}"
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options[argv[1]], f"unknown option {arg} in {command!r}"
    for arg in argv:
        if arg.startswith("pipelines/"):
            assert (REPO / arg).is_file(), f"{command!r} names a missing config {arg}"
    build_parser().parse_args(argv[1:])  # parses as the CLI would


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, where: str, need_gpu: bool) -> None:
    assert spec["rayVersion"] == RAY_PIN, f"{where}: rayVersion must equal the ray pin"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"]), where
    ports = {p["containerPort"] for p in _containers(head["template"])[0]["ports"]}
    assert {6379, 8265, 10001} <= ports, f"{where}: head must expose GCS, dashboard, client"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    gpu_groups = []
    for group in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        for container in _containers(group["template"]):
            assert container["image"].startswith("REGISTRY/stiv-engine:"), where
            names = {s["secretRef"]["name"] for s in container.get("envFrom", [])}
            assert {"stiv-s3", "stiv-ray-auth"} <= names, f"{where}: secrets missing"
            limits = container["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                gpu_groups.append(group)
                assert container["image"].endswith("-gpu"), f"{where}: GPU group, CPU image"
                tolerations = group["template"]["spec"]["tolerations"]
                assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), where
    if need_gpu:
        assert gpu_groups, f"{where}: needs a GPU worker group with nvidia.com/gpu limits"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests(path: Path) -> None:
    """Each KubeRay manifest has the Kubernetes envelope, a valid RayCluster spec with the
    image we build, and (for RayJobs) an entrypoint that our CLI accepts."""
    for doc in _docs(path):
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path.name
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]
        if doc["kind"] == "RayCluster":
            _check_ray_cluster_spec(doc["spec"], path.name, need_gpu=True)
        elif doc["kind"] == "RayJob":
            _check_stiv_command(doc["spec"]["entrypoint"])
            need_gpu = " train " in f" {doc['spec']['entrypoint']} "
            _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"], path.name, need_gpu)
        else:
            pytest.fail(f"{path.name}: unexpected kind {doc['kind']}")


def test_kuberay_covers_cluster_curation_and_training() -> None:
    """The issue asks for a RayCluster and RayJobs for curation and for training."""
    found = set()
    for path in KUBERAY:
        for doc in _docs(path):
            command = doc["spec"].get("entrypoint", "").split()
            found.add((doc["kind"], command[1] if command else ""))
    assert {("RayCluster", ""), ("RayJob", "curate"), ("RayJob", "train")} <= found


def test_train_job_worker_count_matches_gpus() -> None:
    """Ray Train places one worker per GPU: scaling.num_workers in the entrypoint must equal
    the GPUs the job's cluster provides, or the job waits for ever for missing GPUs."""
    (job,) = _docs(INFRA / "kuberay" / "rayjob-train.yaml")
    match = re.search(r"scaling\.num_workers=(\d+)", job["spec"]["entrypoint"])
    assert match, "rayjob-train.yaml: set scaling.num_workers in the entrypoint"
    gpus = sum(
        g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in _containers(g["template"])
    )
    assert int(match.group(1)) == gpus


def test_cluster_launcher_config() -> None:
    """The Ray autoscaler's required keys are present, the head type exists, there are CPU and
    GPU worker types, and the images are ours."""
    (cfg,) = _docs(INFRA / "cluster-launcher.yaml")
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, name
        assert node["node_config"]["InstanceType"], name
        if name != cfg["head_node_type"]:
            assert node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
    assert cfg["docker"]["image"].startswith("REGISTRY/stiv-engine:")
    gpu_images = [n["docker"]["worker_image"] for n in types.values() if "docker" in n]
    assert gpu_images and all(i.endswith("-gpu") for i in gpu_images)
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


def test_dockerfile_builds_from_the_pinned_ray_image_and_installs_the_package() -> None:
    """The image uses the same Ray as our pins (head, workers and clients must match), takes a
    GPU base as a build argument, installs with constraints.txt, and copies every package and
    the pipelines/ configs the manifests name."""
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1) == f"rayproject/ray:{RAY_PIN}-py311"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert f"rayproject/ray:{RAY_PIN}-py311-gpu" in text
    assert "-c constraints.txt" in text
    copied = set(re.findall(r"^COPY .*? (\S+) \./\S*$", text, re.M))
    for needed in ("stiv", "stiv_core", "data_engine", "model", "training", "pipelines"):
        assert needed in copied, f"Dockerfile does not copy {needed}/"
        assert (REPO / needed).is_dir()
    for source in ("pyproject.toml", "constraints.txt", "README.md"):
        assert (REPO / source).is_file()
    # Every image the manifests use is one this Dockerfile's build comments produce.
    tags = set(re.findall(r"-t (REGISTRY/stiv-engine:\S+)", text))
    used = set(re.findall(r"REGISTRY/stiv-engine:[\w.-]+", _all_infra_text()))
    assert used <= tags, f"images not built by the Dockerfile: {used - tags}"


def _all_infra_text() -> str:
    return "\n".join(p.read_text() for p in [*KUBERAY, INFRA / "cluster-launcher.yaml"])


def test_every_user_edit_is_marked() -> None:
    """Placeholders a user must replace (registry, bucket, AMI, account) sit on lines marked
    EDIT, or on a line right under an EDIT comment, so nothing ships with a silent dummy."""
    placeholders = ("REGISTRY/", "BUCKET", "ami-0123456789abcdef0", "123456789012")
    for path in [*KUBERAY, INFRA / "cluster-launcher.yaml"]:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.lstrip().startswith("#") or not any(p in line for p in placeholders):
                continue
            context = "\n".join(lines[max(0, number - 4) : number + 1])
            assert "EDIT" in context, f"{path.name}:{number + 1} placeholder without EDIT"
