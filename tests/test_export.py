"""Export to safetensors and load_pretrained: exact round trips (dense, FlyLoRA, MoE,
bf16, shards, an 8-device checkpoint loaded on 1 device), generate --model, and every
bad-input error as one line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import vesperjax as vj
from vesperjax import export as ex
from vesperjax import generate as gen
from vesperjax.inference import pretrained as fmt
from vesperjax import sharding as vj_sharding
from vesperjax.inference.loading import load_model
from vesperjax.run_config import default_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"dense": dict(lora_rank=0), "flylora": dict(lora_rank=4, lora_topk=2),
         "moe": dict(lora_rank=4, lora_topk=2, num_experts=4, top_k=2)}
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)


def save_run(workdir, mesh=None, **model):
  """A run directory whose checkpoint (step 2) holds a freshly initialised 2-layer model
  with FlyLoRA's B and routing biases moved off their zero init, as training does; the
  state is built and saved sharded on `mesh` (default: 8-way data parallel)."""
  from vesperjax.training import build
  from vesperjax.checkpoint import Checkpointer
  from vesperjax.data import padded_vocab_size
  from vesperjax.data.tokenizer import byte_tokenizer
  from vesperjax.run_config import as_run_config
  run = default_run_config("tiny")
  run.model.update(dict(hidden_size=32, num_heads=2, num_layers=2, ffn_size=64,
                        max_seq_len=64, **model))
  run.data.update(dict(tokenizer="byte", seq_len=32))
  run.train.update(dict(batch_size=8, max_steps=2))
  if mesh:
    run.mesh.update(mesh)
  run = as_run_config(run)
  tok = byte_tokenizer()
  mesh = build.checked_mesh(run, 8)
  built = build.build_model(run, mesh, vocab_size=padded_vocab_size(tok.vocab_size),
                            valid_vocab=tok.vocab_size)
  with jax.set_mesh(mesh):
    state = built.steps.init(jax.random.key(0))
  initial = state
  keys = iter(jax.random.split(jax.random.key(1), 100))

  def moved(path, x):
    if not any(n in jax.tree_util.keystr(path) for n in ("lora_b", "routing_bias")):
      return x
    return jax.device_put(x + 0.05 * jax.random.normal(next(keys), x.shape), x.sharding)
  state = state.replace(params=jax.tree_util.tree_map_with_path(moved, state.params),
                        rest=jax.tree_util.tree_map_with_path(moved, state.rest))
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(str(workdir), log=lambda line: None)
  ckpt.save(2, state, force=True)
  ckpt.save_best(1, initial, eval_loss=1.0)  # B and routing biases still zero
  ckpt.wait()
  ckpt.close()
  build.write_run_files(str(workdir), run, built.config, tok)
  return str(workdir), state


def logits(model, tokens=TOKENS):
  return np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(tokens)))


def stored(directory):
  """{name: numpy array} of every tensor in an export, read with safetensors alone."""
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), framework="numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.parametrize("kind", ["dense", "flylora", "moe"])
def test_fp32_round_trip_is_exact(runs, tmp_path, kind):
  workdir = runs(kind)
  out = str(tmp_path / "export")
  result = ex.export(workdir, out)
  assert result["files"] == ["model.safetensors"] and result["source"]["step"] == 2
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  reference, _, _ = load_model(workdir)
  model, tok = vj.load_pretrained(out)
  np.testing.assert_array_equal(logits(model), logits(reference))
  assert model.blocks.ffn.gate.deterministic  # eval mode
  assert tok.vocab_size == vj.load_pretrained(out).tokenizer.vocab_size
  # the names are the dotted variable paths, the layer stack split per layer
  tensors = stored(out)
  ref = dict(nnx.to_flat_state(nnx.state(reference)))
  cfg = reference.config
  assert len(tensors) == sum(int(np.prod(v.shape[:1])) if p[0] == "blocks" else 1
                             for p, v in ref.items())
  np.testing.assert_array_equal(tensors["embed"], ref[("embed",)][...])
  for i in range(cfg.num_layers):
    np.testing.assert_array_equal(tensors[f"layers.{i}.attn.qkv_kernel"],
                                  ref[("blocks", "attn", "qkv_kernel")][...][i])
  if cfg.lora_rank:  # FlyLoRA's frozen A and trained routing bias are stored in fp32
    name = "layers.1.ffn.up.lora_a"
    assert tensors[name].dtype == np.float32
    np.testing.assert_array_equal(tensors[name], ref[("blocks", "ffn", "up", "lora_a")][...][1])
    assert np.abs(tensors["layers.0.ffn.gate.routing_bias"]).max() > 0
    assert np.abs(tensors["layers.0.ffn.gate.lora_b"]).max() > 0
  if cfg.is_moe:
    assert tensors["layers.0.ffn.gate.kernel"].shape == (4, 32, 64)
    assert tensors["layers.1.ffn.router"].shape == (32, 4)


def test_best_and_step_choose_the_checkpoint(runs, tmp_path):
  workdir = runs("flylora")
  best = ex.export(workdir, str(tmp_path / "best"), best=True)
  assert best["source"] == {"step": 1, "checkpoint": "best"}
  tensors = stored(tmp_path / "best")
  assert not np.abs(tensors["layers.1.ffn.up.lora_b"]).any()  # the initial state
  two = ex.export(workdir, str(tmp_path / "two"), step=2)
  assert two["source"] == {"step": 2, "checkpoint": "step"}
  latest = stored(tmp_path / "two")
  assert np.abs(latest["layers.1.ffn.up.lora_b"]).any()
  np.testing.assert_array_equal(latest["embed"], tensors["embed"])


def _rounded_to_bf16(model):
  """The same model with every Param rounded to bf16 (kept as float32)."""
  params = nnx.state(model, nnx.Param)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, rounded, rest)


@pytest.mark.parametrize("kind", ["flylora", pytest.param("moe", marks=pytest.mark.slow)])
def test_bf16_round_trip_is_the_model_with_bf16_weights(runs, tmp_path, kind):
  workdir = runs(kind)
  out = str(tmp_path / "bf16")
  ex.export(workdir, out, dtype="bf16")
  assert json.load(open(os.path.join(out, "config.json")))["weights_dtype"] == "bfloat16"
  tensors = stored(out)
  assert tensors["embed"].dtype == ml_dtypes.bfloat16
  assert tensors["layers.0.ffn.gate.lora_a"].dtype == np.float32
  reference, _, _ = load_model(workdir)
  model, _ = vj.load_pretrained(out)
  assert model.embed[...].dtype == jnp.bfloat16
  got = logits(model)
  # exactly the checkpoint's model with its weights rounded to bf16 (computed in fp32) ...
  np.testing.assert_array_equal(got, logits(_rounded_to_bf16(reference)))
  if not reference.config.is_moe:
    # ... so within bf16 rounding of the fp32 logits: 2^-9 relative per weight, a few
    # times over through the layers. (MoE: a token whose router scores are nearly tied
    # may go to another expert, a discrete change, so only the equality above holds.)
    exact = logits(reference)
    assert np.abs(got - exact).max() < 2 ** -6 * np.abs(exact).max()
  upcast, _ = vj.load_pretrained(out, dtype="float32")
  assert upcast.embed[...].dtype == jnp.float32
  np.testing.assert_array_equal(logits(upcast), got)


def test_sharded_export_has_a_correct_index(runs, tmp_path):
  workdir = runs("flylora")
  out = str(tmp_path / "sharded")
  result = ex.export(workdir, out, max_shard_size="20KB")
  n = len(result["files"])
  assert n > 2 and result["files"][0] == f"model-00001-of-{n:05d}.safetensors"
  assert "model.safetensors" not in os.listdir(out)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  tensors, sizes = {}, {}
  for name in result["files"]:
    path = os.path.join(out, name)
    with safe_open(path, framework="numpy") as f:
      keys = list(f.keys())
      for k in keys:
        assert index["weight_map"][k] == name
        tensors[k] = f.get_tensor(k)
    sizes[name] = sum(tensors[k].nbytes for k in keys)
    assert sizes[name] <= 20_000 or len(keys) == 1  # a larger tensor alone
  assert set(index["weight_map"]) == set(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  single = str(tmp_path / "single")
  ex.export(workdir, single)
  whole = stored(single)
  assert set(whole) == set(tensors)
  for k in whole:
    np.testing.assert_array_equal(whole[k], tensors[k])
  model, _ = vj.load_pretrained(out)
  np.testing.assert_array_equal(logits(model), logits(vj.load_pretrained(single).model))
  # onto a mesh of all 8 devices, split by the logical rules
  sharded, _ = vj.load_pretrained(out, mesh=vj_sharding.make_mesh(fsdp=-1))
  embed = sharded.embed[...]
  assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
  np.testing.assert_allclose(logits(sharded), logits(model), rtol=1e-5, atol=1e-6)


def test_two_processes_export_what_one_does(runs, tmp_path):
  """2 processes x 2 CPU devices: every process restores its shards and joins each
  gather, process 0 writes; the files hold the same tensors as a one-process export."""
  import socket
  workdir = runs("flylora")
  with socket.socket() as sock:  # a free port, taken just before the coordinator binds it
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    log = open(tmp_path / f"{i}.log", "w")  # files: an undrained pipe could block a child
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "vesperjax.export", f"--workdir={workdir}",
         f"--out={tmp_path / 'two'}", "--max-shard-size=30KB"], cwd=ROOT, env=env,
        stdout=log, stderr=subprocess.STDOUT))
  for i, proc in enumerate(procs):
    assert proc.wait(timeout=300) == 0, (tmp_path / f"{i}.log").read_text()[-3000:]
  ex.export(workdir, str(tmp_path / "one"))
  two, one = stored(tmp_path / "two"), stored(tmp_path / "one")
  assert len([f for f in os.listdir(tmp_path / "two") if f.endswith(".safetensors")]) > 1
  assert set(two) == set(one)
  for k in one:
    np.testing.assert_array_equal(two[k], one[k])


def test_checkpoint_from_8_device_mesh_exports_and_loads_on_one_device(tmp_path):
  workdir, state = save_run(tmp_path / "run", mesh=dict(data=1, fsdp=4, expert=2),
                            **KINDS["moe"])
  kernel = state.params["blocks"]["ffn"]["gate"]["kernel"][...]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  out = tmp_path / "export"
  np.save(tmp_path / "tokens.npy", TOKENS)
  # a process with one device: the export CLI, then load_pretrained and the logits
  code = ("import sys, numpy as np, jax, vesperjax as vj; from flax import nnx;"
          "from vesperjax import export; assert jax.device_count() == 1;"
          "code = export.main(['export', '--workdir=' + sys.argv[1], '--out=' + sys.argv[2],"
          " '--max-shard-size=50KB']); assert code == 0, code;"
          "m, _ = vj.load_pretrained(sys.argv[2]); x = np.load(sys.argv[3]);"
          "np.save(sys.argv[4], np.asarray(nnx.jit(lambda m, x: m(x)[0])(m, x)))")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code, workdir, str(out),
                         str(tmp_path / "tokens.npy"), str(tmp_path / "logits.npy")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported step 2" in proc.stderr
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
  reference, _, _ = load_model(workdir)  # restored onto one device (tests/test_train.py)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits(reference),
                             rtol=1e-5, atol=1e-5)
  model, _ = vj.load_pretrained(str(out))
  np.testing.assert_array_equal(logits(model), logits(reference))


def test_generate_model_matches_generate_workdir(runs, tmp_path, capsys):
  workdir = runs("flylora")
  out = str(tmp_path / "export")
  assert ex.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  args = ["generate", "--prompt=def main(", "--max-tokens=12", "--temperature=0"]
  capsys.readouterr()
  assert gen.main(args + [f"--workdir={workdir}"]) == 0
  from_run = capsys.readouterr().out
  assert gen.main(args + [f"--model={out}"]) == 0
  from_export = capsys.readouterr().out
  assert from_export == from_run and from_run.startswith("def main(")
  assert len(from_run) > len("def main(\n")


def one_error(capsys, code):
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_export_errors_are_one_line(runs, tmp_path, capsys):
  workdir = runs("flylora")
  run = lambda *a: ex.main(["export", *a])
  (tmp_path / "x.txt").write_text("x")
  assert "not empty" in one_error(capsys, run(f"--workdir={workdir}", f"--out={tmp_path}"))
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "model_config.json").write_text(open(os.path.join(workdir,
                                                              "model_config.json")).read())
  (empty / "tokenizer.json").write_text(open(os.path.join(workdir, "tokenizer.json")).read())
  msg = one_error(capsys, run(f"--workdir={empty}", f"--out={tmp_path / 'a'}"))
  assert "no checkpoint" in msg and not (tmp_path / "a").exists()
  assert "no such directory" in one_error(capsys, run(f"--workdir={tmp_path / 'nope'}",
                                                      f"--out={tmp_path / 'b'}"))
  assert "not both" in one_error(capsys, run(f"--workdir={workdir}", "--step=2", "--best",
                                             f"--out={tmp_path / 'c'}"))
  assert "step 7" in one_error(capsys, run(f"--workdir={workdir}", "--step=7",
                                           f"--out={tmp_path / 'd'}"))
  assert "max-shard-size" in one_error(capsys, run(f"--workdir={workdir}", "--out=x",
                                                   "--max-shard-size=lots"))
  assert "outside the run" in one_error(capsys, run(f"--workdir={workdir}",
                                                    f"--out={workdir}", "--overwrite"))
  assert "--out" in one_error(capsys, run(f"--workdir={workdir}"))
  assert not [p for p in os.listdir(tmp_path) if "export-tmp" in p]


def test_overwrite_replaces_and_a_crash_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
  workdir = runs("dense")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert "not empty" in one_error(capsys, ex.main(["export", f"--workdir={workdir}",
                                                   f"--out={out}"]))
  assert os.listdir(out) == ["keep.txt"]

  def fail(*_a, **_k):
    raise OSError("disk full")
  monkeypatch.setattr(ex, "_write_json", fail)  # after the safetensors, before config.json
  assert "disk full" in one_error(capsys, ex.main(["export", f"--workdir={workdir}",
                                                   f"--out={out}", "--overwrite"]))
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
  monkeypatch.undo()
  assert ex.main(["export", f"--workdir={workdir}", f"--out={out}", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_load_errors_are_one_line(runs, tmp_path, capsys):
  workdir = runs("flylora")
  good = str(tmp_path / "good")
  ex.export(workdir, good, max_shard_size="30KB")
  load = lambda d: gen.main(["generate", "--prompt=x", f"--model={d}"])

  def broken(name, change):
    d = tmp_path / name
    subprocess.run(["cp", "-r", good, str(d)], check=True)
    change(d)
    return d

  def edit_config(**kv):
    def change(d):
      cfg = json.load(open(d / "config.json"))
      for k, v in kv.items():
        (cfg["model"] if k in cfg["model"] else cfg)[k] = v
      (d / "config.json").write_text(json.dumps(cfg))
    return change

  assert "not a vesperjax export" in one_error(capsys, load(workdir))  # a run, not export
  foreign = broken("foreign", lambda d: (d / "config.json").write_text('{"model_type": "x"}'))
  assert "not a vesperjax export" in one_error(capsys, load(foreign))
  shard = sorted(p for p in os.listdir(good) if p.endswith(".safetensors"))[1]
  missing = broken("missing", lambda d: os.remove(d / shard))
  assert f"shard {shard} is missing" in one_error(capsys, load(missing))
  shape = broken("shape", edit_config(ffn_size=128))
  msg = one_error(capsys, load(shape))
  assert "config.json implies float32 [128, 32]" in msg  # ffn_size 64 -> 128
  dtype = broken("dtype", edit_config(weights_dtype="bfloat16"))
  assert "config.json implies bfloat16" in one_error(capsys, load(dtype))
  garbled = broken("garbled", lambda d: (d / shard).write_bytes(b"\x00" * 64))
  assert "not a readable safetensors file" in one_error(capsys, load(garbled))
  msg = one_error(capsys, gen.main(["generate", "--prompt=x", f"--model={good}",
                                    f"--workdir={workdir}"]))
  assert "--model" in msg and "--workdir" in msg
  with pytest.raises(fmt.ExportFormatError, match="not a vesperjax export"):
    vj.load_pretrained(str(foreign))
