"""vesperjax.plan: deviceless XLA:GPU and libtpu plans of the real train step (memory,
fits, max batch), the Chinchilla auto-scale, and one-line errors for bad input.

The compile tests use tiny shrunk to 2 layers at seq 64 and skip, saying why, without the
CUDA plugin wheels (tests/gpu_util.py) or libtpu (tests/tpu_util.py).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.gpu_util import needs_gpu_compile
from tests.tpu_util import TPU_COMPILE_PROBLEM, needs_tpu_compile
from vesperjax.kernels import platform
from vesperjax.planning import gpu_targets, program, search
from vesperjax.training.train_step import flops_per_token
from vesperjax.model.size import num_params
from vesperjax.data import cache as token_cache
from vesperjax.run_config import RunConfig, default_run_config, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"params_total", "params_trainable", "per_device_bytes", "device_memory_bytes",
        "fits", "compile_s", "collectives", "custom_calls", "target", "devices", "mesh",
        "batch_size", "seq_len", "remat", "mem_fraction"}


def _run(**mesh):
  run = default_run_config("tiny")
  run.model.num_layers = 2
  run.data.seq_len = 64
  run.train.batch_size = 8
  for k, v in mesh.items():
    run.mesh[k] = v
  return RunConfig.from_config_dict(run)


@pytest.fixture(scope="module")
def tiny_plan():
  return program.plan_step(_run(), target="h100-80gb")


@needs_gpu_compile
def test_plan_keys_and_values(tiny_plan):
  p = tiny_plan
  assert KEYS <= set(p), KEYS - set(p)
  json.dumps(p)  # the --json object
  config = model_config(_run(), search.DEFAULT_VOCAB)
  assert p["vocab_size"] == 32768 and p["target"] == "h100-80gb" and p["devices"] == 1
  assert p["params_trainable"] == num_params(config)
  # frozen: per layer, FlyLoRA's A [hidden, rank] and routing bias [rank] in gate and up
  d, r, layers = config.hidden_size, config.lora_rank, config.num_layers
  assert p["params_total"] == p["params_trainable"] + layers * 2 * (d * r + r)
  mem = p["per_device_bytes"]
  assert mem["total"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temp"]
  assert mem["temp"] > 0 and mem["xla_peak"] <= mem["total"]
  # arguments: fp32 params + Velvet's m and v (12 bytes / trainable param) + the batch
  batch_bytes = 8 * 65 * 4
  assert mem["arguments"] >= 12 * p["params_trainable"] + batch_bytes
  assert mem["arguments"] < 13 * p["params_total"] + batch_bytes
  # the donated state is updated in place: every output but the metrics is aliased
  assert mem["arguments"] - batch_bytes - 1024 < mem["aliased"] <= mem["outputs"]
  assert p["device_memory_bytes"] == gpu_targets.device_memory_bytes("h100-80gb")
  assert p["fits"] is True and p["mem_fraction"] == 0.75
  assert p["budget_bytes"] == int(0.75 * p["device_memory_bytes"])
  assert p["compile_s"] > 0 and p["collectives"] == {}
  assert p["custom_calls"].get("__cudnn$fmhaSoftmax") and p["remat"] == "none"


@needs_gpu_compile
def test_fsdp_over_eight_devices_shards_the_state(tiny_plan):
  p8 = program.plan_step(_run(data=1, fsdp=8), target="h100-80gb", devices=8)
  assert p8["mesh"]["fsdp"] == 8 and p8["devices"] == 8
  assert p8["params_total"] == tiny_plan["params_total"]  # global counts
  one, eight = tiny_plan["per_device_bytes"], p8["per_device_bytes"]
  assert eight["arguments"] < one["arguments"] / 4
  assert "all-gather" in p8["collectives"], p8["collectives"]


@needs_gpu_compile
@pytest.mark.slow  # ~30 s of GPU compiles; the search itself: test_search_on_a_known_curve
def test_max_batch_finds_the_boundary(tiny_plan):
  """A budget of exactly the batch-8 figure: B fits, B + 1 does not, both recompiled."""
  total = tiny_plan["per_device_bytes"]["total"]
  fraction = (total + 0.5) / tiny_plan["device_memory_bytes"]
  found = program.max_batch(_run(), target="h100-80gb", mem_fraction=fraction)
  b, d = found["max_batch"], found["divisor"]
  assert d == 1 and b >= 1 and found["compiles"] <= 4, found
  assert found["budget_bytes"] == total and found["per_device_bytes"] <= total
  run = _run()
  if b == 8:
    at = tiny_plan  # itself an independent compile at batch 8
  else:
    at = program.plan_step(run.replace(train=dict(batch_size=b)), target="h100-80gb",
                        mem_fraction=fraction)
  above = program.plan_step(run.replace(train=dict(batch_size=b + d)), target="h100-80gb",
                         mem_fraction=fraction)
  assert at["per_device_bytes"]["total"] <= total < above["per_device_bytes"]["total"]
  assert at["per_device_bytes"]["total"] == found["per_device_bytes"]
  assert not above["fits"]


# -- TPU targets: libtpu compiles for a v5e slice ---------------------------------------

@pytest.fixture(scope="module")
def tiny_tpu_plan():
  return program.plan_step(_run(data=2, fsdp=2), target="v5e", topology="2x2")


@needs_tpu_compile
def test_tpu_plan_keys_and_values(tiny_tpu_plan):
  """tiny (2 layers, seq 64, batch 8) on v5e 2x2, data=2 x fsdp=2: the state is the fp32
  parameters and Velvet's m and v, halved by FSDP; 16 GiB a chip, 75% of it the budget."""
  p = tiny_tpu_plan
  assert KEYS <= set(p), KEYS - set(p)
  json.dumps(p)
  assert (p["kind"], p["target"], p["topology"], p["devices"], p["hosts"]) == (
      "tpu", "v5e", "2x2", 4, 1)
  assert p["device_kind"] == "TPU v5 lite" and p["mesh"]["fsdp"] == 2
  config = model_config(_run(), search.DEFAULT_VOCAB)
  assert p["params_trainable"] == num_params(config)
  mem = p["per_device_bytes"]
  batch_bytes = 8 * 65 * 4 // 4  # the token batch, split over data x fsdp
  assert mem["arguments"] >= 12 * p["params_trainable"] // 2 + batch_bytes
  assert mem["arguments"] < 13 * p["params_total"] // 2 + batch_bytes
  assert mem["arguments"] - batch_bytes - 1024 < mem["aliased"] <= mem["outputs"]
  # libtpu's peak: the live buffers, the resident state included
  assert mem["total"] == mem["xla_peak"] and mem["total"] > mem["arguments"]
  assert mem["code"] > 0 and p["compiler_refused"] is None
  assert p["device_memory_bytes"] == 16 * 2**30
  assert p["budget_bytes"] == int(0.75 * 16 * 2**30) and p["fits"] is True
  assert "all-gather" in p["collectives"], p["collectives"]  # FSDP's weight gathers
  assert p["choices"]["attention"] == platform.CHOICES["attention"]["tpu"]
  tokens = 8 * 64
  assert p["model_flops"] == flops_per_token(config, 64) * tokens
  assert 6 * p["params_trainable"] * tokens < p["model_flops"] < 7 * p["params_total"] * tokens
  assert p["xla_flops"] > 0


@needs_tpu_compile
def test_tpu_plan_of_an_absurd_batch_does_not_fit():
  """200,000 sequences: libtpu refuses the compile for HBM; its figure is the total."""
  run = _run(data=2, fsdp=2).replace(train=dict(batch_size=200_000))
  p = program.plan_step(run, target="v5e", topology="2x2")
  refused = p["compiler_refused"]
  assert p["fits"] is False and refused is not None
  assert refused["available_bytes"] == int(15.75 * 2**30)  # v5e's 16 GiB less libtpu's
  assert p["per_device_bytes"]["total"] == refused["required_bytes"] > 16 * 2**30


@needs_tpu_compile
@pytest.mark.slow  # 5 libtpu compiles: 18 minutes on the loaded 2-core VM
def test_tpu_max_batch_finds_the_boundary():
  """A budget of the batch-512 figure: the largest fitting batch fits when recompiled,
  and one batch split (4) more does not. (Below batch ~64 libtpu's peak is flat, 199 MB
  from batch 8 to 16: a budget there would walk the flat part one split at a time.)"""
  run = _run(data=2, fsdp=2)
  plan = lambda batch, fraction=0.75: program.plan_step(
      run.replace(train=dict(batch_size=batch)), target="v5e", topology="2x2",
      mem_fraction=fraction)
  ref = plan(512)
  total = ref["per_device_bytes"]["total"]
  fraction = (total + 0.5) / ref["device_memory_bytes"]
  found = program.max_batch(run, target="v5e", topology="2x2", mem_fraction=fraction,
                            start=512)
  b, d = found["max_batch"], found["divisor"]
  assert d == 4 and b >= 512 and found["budget_bytes"] == total, found
  at = ref if b == 512 else plan(b, fraction)
  above = plan(b + d, fraction)
  assert at["per_device_bytes"]["total"] == found["per_device_bytes"] <= total
  assert not above["fits"] and above["per_device_bytes"]["total"] > total


def test_search_on_a_known_curve():
  """The search itself, on a made-up curve that is affine with a kink: exact boundary."""
  curve = lambda b: 1000 + 37 * b + (500 if b > 60 else 0)
  calls = []
  found = search.search_max_batch(lambda b: calls.append(b) or curve(b), 4000, 4)
  best = max(b for b in range(4, 200, 4) if curve(b) <= 4000)
  assert found["max_batch"] == best and curve(best + 4) > 4000
  assert found["compiles"] == len(calls) <= 6
  assert found["next_bytes"] == curve(best + 4) and not found["above_predicted"]
  assert search.search_max_batch(curve, 900, 4)["max_batch"] == 0
  # hints: an intercept at batch 0 and a first batch (affine: start, boundary, above)
  calls.clear()
  affine = lambda b: 1000 + 37 * b
  hinted = search.search_max_batch(lambda b: calls.append(b) or affine(b), 4000, 4,
                                 seed=[(0, 1000)], start=40)
  assert hinted["max_batch"] == 80 and calls == [40, 80, 84], calls
  # another card's curve as seed; the step above left to the line
  calls.clear()
  seeded = search.search_max_batch(lambda b: calls.append(b) or curve(b) + 100, 4000, 4,
                                 seed=found["points"], confirm_above=False)
  assert seeded["max_batch"] == max(b for b in range(4, 200, 4) if curve(b) + 100 <= 4000)
  assert seeded["above_predicted"] and len(calls) <= 3, calls


def test_chinchilla_hand_derived():
  # batch 8 x accum 1 x seq 256, vocab 32768
  run = RunConfig.from_config_dict(default_run_config("tiny"))
  c = search.chinchilla(run, 2_000_000_000)
  # medium at vocab 32768 (hidden 768, 12 layers, ffn 3072, FlyLoRA rank 16):
  ffn = 2 * (768 * 3072 + 3072) + 2 * 16 * 3072 + (3072 * 768 + 768)
  attention = 768 * 3 * 768 + 3 * 768 + 768 * 768 + 768
  medium = 32768 * 768 + 12 * (4 * 768 + attention + ffn) + 2 * 768
  assert medium == 139_749_888
  # 2e9 / 20 = 1e8: medium (1.40x) is nearer than small (50.9M: 1.96x)
  assert c["params_optimal"] == 1e8 and c["preset"] == "medium"
  assert c["preset_params"] == medium
  assert c["tokens_per_step"] == 8 * 1 * 256 and c["steps"] == 976_563  # ceil(2e9 / 2048)
  run = run.replace(train=dict(grad_accum=4), data=dict(seq_len=2048))
  c = search.chinchilla(run, 26_000_000_000)  # 1.3e9 params: xlarge (1,286,297,600)
  assert c["preset"] == "xlarge" and c["steps"] == -(-26_000_000_000 // (8 * 4 * 2048))


@pytest.mark.parametrize("text,value", [
    ("2e9", 2_000_000_000), ("2_000_000_000", 2_000_000_000), ("2B", 2_000_000_000),
    ("500M", 500_000_000), ("1.5T", 1_500_000_000_000), ("750k", 750_000)])
def test_parse_tokens(text, value):
  assert search.parse_tokens(text) == value


def test_input_checks():
  for args, words in [(("h100",), "unknown --target"), (("h200", 0), "--devices"),
                      (("h200", 1, 1.5), "--mem-fraction"), (("h200", 1, 0.0), "--mem-fraction")]:
    with pytest.raises(ValueError, match=words):
      program.check_target(*args)
  for text in ("", "-5", "2X", "1e", "0"):
    with pytest.raises(ValueError, match="--tokens"):
      search.parse_tokens(text)


def _fake_cache(path, n_tokens=123_457):
  os.makedirs(path)
  header = dict(format_version=token_cache.FORMAT_VERSION, num_tokens=n_tokens, num_docs=3,
                dtype="uint16", vocab_size=8192, eod_id=0)
  with open(os.path.join(path, token_cache.HEADER), "w") as f:
    json.dump(header, f)
  np.zeros(n_tokens, np.uint16).tofile(os.path.join(path, token_cache.TOKENS))
  np.zeros(3, np.int64).tofile(os.path.join(path, token_cache.DOCS))
  return path


def _plan_cli(*args, env=None):
  return subprocess.Popen([sys.executable, "-m", "vesperjax.plan", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_tokens_from_a_cache_without_compiling(tmp_path):
  cache = _fake_cache(str(tmp_path / "stdlib-train-0123"))
  assert search.parse_tokens(cache) == 123_457
  proc = _plan_cli("--config", "experiments/tiny.py", "--tokens", cache, "--json")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  c = json.loads(out)["chinchilla"]
  assert c["tokens"] == 123_457 and c["steps"] == -(-123_457 // (8 * 256))
  assert "per_device_bytes" not in json.loads(out) and "compiling" not in err


def _fake_plugin(tmp):
  """A path entry where jax-cuda12-pjrt reports version 0.0.1 (a mismatched plugin)."""
  dist = tmp / "jax_cuda12_pjrt-0.0.1.dist-info"
  dist.mkdir(parents=True)
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-pjrt\n"
                                 "Version: 0.0.1\n")
  return {"PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}


def _fake_libtpu(tmp):
  """A path entry where libtpu reports version 0.0.1 (not the one jax pins)."""
  dist = tmp / "libtpu-0.0.1.dist-info"
  dist.mkdir(parents=True)
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.1\n")
  return {"PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}


BAD = {
    "unknown-target": (["--target", "h100"], "unknown --target"),
    "bad-tokens": (["--tokens", "12xyz"], "not a token count"),
    "missing-cache": (["--tokens", "./no/such/cache"], "no such token cache"),
    "plugin-mismatch": (["--target", "h200"], "deviceless GPU compile unavailable"),
    "impossible-mesh": (["--target", "h100-80gb", "--devices", "3",
                         "--config.mesh.fsdp=2"], "mesh"),
    "batch-not-divisible": (["--target", "h100-80gb", "--devices", "8",
                             "--config.train.batch_size=12"], "not a positive multiple of 8"),
    "unknown-tpu": (["--target", "v7"], "unknown --target 'v7'"),
    "tpu-topology-shape": (["--target", "v4", "--topology", "2x2"], "3-D"),
    "tpu-devices": (["--target", "v5e", "--devices", "8"], "--devices is for GPU targets"),
    "gpu-topology": (["--target", "h200", "--topology", "2x2"], "--topology is for TPU"),
    "libtpu-mismatch": (["--target", "v5e"], "vesperjax[tpu-compile]"),
    "tpu-topology-refused": (["--target", "v5e", "--topology", "3x3"], "libtpu refuses"),
    "tpu-mesh-too-big": (["--target", "v5e", "--topology", "2x2",
                          "--config.mesh.fsdp=8"], "mesh"),
}
NEEDS_PLUGIN = {"impossible-mesh", "batch-not-divisible"}
NEEDS_LIBTPU = {"tpu-topology-refused", "tpu-mesh-too-big"}
FAKES = {"plugin-mismatch": _fake_plugin, "libtpu-mismatch": _fake_libtpu}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """All the bad-input subprocesses, started together (they are mostly start-up time)."""
  procs = {}
  for name, (args, _) in BAD.items():
    if ((name in NEEDS_PLUGIN and gpu_targets.plugin_problem())
        or (name in NEEDS_LIBTPU and TPU_COMPILE_PROBLEM)):
      continue
    env = FAKES[name](tmp_path_factory.mktemp(name)) if name in FAKES else None
    procs[name] = _plan_cli("--config", "experiments/tiny.py", *args, env=env)
  done = {}
  for name, p in procs.items():
    out, err = p.communicate(timeout=300)
    done[name] = (p.returncode, out, err)
  return done


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_error_line(bad_runs, name):
  if name not in bad_runs:
    pytest.skip(f"needs the CUDA plugin or libtpu: {gpu_targets.plugin_problem()} / "
                f"{TPU_COMPILE_PROBLEM}")
  code, out, err = bad_runs[name]
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert code == 2, err
  assert "Traceback" not in err and out == ""
  assert lines[-1].startswith("error: ") and BAD[name][1] in lines[-1], lines[-1]
  assert sum(l.startswith("error:") for l in lines) == 1
  assert "compiling" not in err  # every check comes before the slow work
