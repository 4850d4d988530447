"""`python -m vesperjax.export --quantize int8|int4`: a quantized export loads to the model
`quantize_for_inference` makes (bit-equal logits, FlyLoRA and MoE), stores the bytes a
hand count gives, packs int4 as documented, and a tampered file is one error line."""
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import vesperjax as vj
from tests.test_export import logits, one_error, stored
from vesperjax import export as ex
from vesperjax import generate as gen
from vesperjax.inference import pretrained as fmt
from vesperjax.inference import quantize as qz
from vesperjax import sharding as vj_sharding
from vesperjax.inference.loading import load_model

BITS = {"int8": 8, "int4": 4}



def reference_pack(codes: np.ndarray) -> np.ndarray:
  """docs/export.md's int4 layout, byte by byte in plain Python."""
  rows = codes.reshape(-1, codes.shape[-1]).tolist()
  out = []
  for row in rows:
    row = row + [0] * (len(row) % 2)
    out.append([(lo % 16) + 16 * (hi % 16) for lo, hi in zip(row[0::2], row[1::2])])
  return np.array(out, np.uint8).reshape(codes.shape[:-1] + (-1,))


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 5), (1,)])
def test_int4_packing_matches_the_reference_and_round_trips(shape):
  codes = np.random.RandomState(0).randint(-8, 8, shape).astype(np.int8)
  codes.flat[0], codes.flat[-1] = -8, 7  # both ends of the range
  packed = fmt.pack_int4(codes)
  assert packed.dtype == np.uint8 and packed.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
  np.testing.assert_array_equal(packed, reference_pack(codes))
  np.testing.assert_array_equal(fmt.unpack_int4(packed, shape[-1]), codes)
  assert fmt.pack_int4(np.array([-1, 3], np.int8)).tolist() == [0x3F]  # hand-packed


def expected_quantized_bytes(config, bits: int) -> tuple[int, int]:
  """(bytes of the quantized weights as floats, as codes + fp32 scales) of one layer:
  qkv [D, 3D] and out [D, D] with 3D and D scales; gate and up [D, F], down [F, D] per
  expert with F, F and D scales."""
  d, f, e = config.hidden_size, config.ffn_size, max(config.num_experts, 1)
  weights = 3 * d * d + d * d + e * 3 * d * f
  scales = 3 * d + d + e * (2 * f + d)
  return 4 * weights, weights * bits // 8 + 4 * scales


@pytest.mark.parametrize("kind,mode", [("flylora", "int8"), ("flylora", "int4"),
                                       ("moe", "int8"), ("moe", "int4")])
def test_quantized_export_loads_to_quantize_for_inference_bit_equal(runs, tmp_path, kind,
                                                                    mode):
  workdir = runs(kind)
  out = str(tmp_path / "export")
  assert ex.main(["export", f"--workdir={workdir}", f"--out={out}",
                  f"--quantize={mode}"]) == 0
  reference = qz.quantize_for_inference(load_model(workdir)[0], mode)
  model, _ = vj.load_pretrained(out)
  assert qz.quantization_mode(model) == mode
  np.testing.assert_array_equal(logits(model), logits(reference))
  assert json.load(open(os.path.join(out, "config.json")))["quantization"] == mode

  config, tensors = reference.config, stored(out)
  for t in qz.quantized_tensors(config):
    name = ".".join(t.module[1:] + (t.name,))
    module = reference
    for attr in t.module:
      module = getattr(module, attr)
    qarray = getattr(module, t.name).get_raw_value()
    codes, scales = np.asarray(qarray.qvalue).astype(np.int8), np.asarray(qarray.scale)
    for i in range(config.num_layers):
      assert f"layers.{i}.{name}" not in tensors
      stored_codes = tensors[f"layers.{i}.{name}.qvalue"]
      if mode == "int4":
        assert stored_codes.dtype == np.uint8
        stored_codes = fmt.unpack_int4(stored_codes, codes.shape[-1])
      assert stored_codes.dtype == np.int8
      np.testing.assert_array_equal(stored_codes, codes[i])
      assert tensors[f"layers.{i}.{name}.scale"].dtype == np.float32
      np.testing.assert_array_equal(tensors[f"layers.{i}.{name}.scale"], scales[i])

  # bytes: the unquantized export's, less each layer's float weights, plus codes + scales
  floats, quantized = expected_quantized_bytes(config, BITS[mode])
  unquantized = sum(int(np.prod(e.shape)) * e.dtype("float32").itemsize
                    for e in fmt.layout(config))
  total = unquantized - config.num_layers * (floats - quantized)
  assert sum(v.nbytes for v in tensors.values()) == total
  with open(os.path.join(out, "model.safetensors"), "rb") as f:
    header = struct.unpack("<Q", f.read(8))[0]
  assert os.path.getsize(os.path.join(out, "model.safetensors")) == 8 + header + total


def test_generate_runs_a_quantized_export_and_refuses_another_mode(runs, tmp_path, capsys):
  workdir = runs("flylora")
  out = str(tmp_path / "export")
  ex.export(workdir, out, quantize="int8", max_shard_size="20KB")  # shards and index too
  assert len([p for p in os.listdir(out) if p.endswith(".safetensors")]) > 1
  model, _ = vj.load_pretrained(out)
  sharded, _ = vj.load_pretrained(out, mesh=vj_sharding.make_mesh(fsdp=-1))  # 8 devices
  codes = sharded.blocks.ffn.down_kernel.get_raw_value().qvalue
  assert len(codes.sharding.device_set) == 8 and not codes.sharding.is_fully_replicated
  np.testing.assert_allclose(logits(sharded), logits(model), rtol=1e-5, atol=1e-6)
  args = ["generate", "--prompt=def main(", "--max-tokens=8", "--temperature=0"]
  capsys.readouterr()
  assert gen.main(args + [f"--workdir={workdir}", "--quantize=int8"]) == 0
  from_run = capsys.readouterr().out
  assert gen.main(args + [f"--model={out}"]) == 0
  assert capsys.readouterr().out == from_run
  assert gen.main(args + [f"--model={out}", "--quantize=int8"]) == 0  # a no-op
  assert capsys.readouterr().out == from_run
  msg = one_error(capsys, gen.main(args + [f"--model={out}", "--quantize=int4"]))
  assert "already quantized to int8" in msg


def test_tampered_quantized_export_is_one_error_line(runs, tmp_path, capsys):
  workdir = runs("flylora")
  good = str(tmp_path / "good")
  ex.export(workdir, good, quantize="int4")
  load = lambda d: gen.main(["generate", "--prompt=x", f"--model={d}"])

  tensors = stored(good)
  name = "layers.1.attn.qkv_kernel.qvalue"
  tensors[name] = tensors[name][:-1]  # one row of D short
  bad = tmp_path / "shape"
  os.makedirs(bad)
  for f in ("config.json", "tokenizer.json"):
    (bad / f).write_text(open(os.path.join(good, f)).read())
  save_file(tensors, str(bad / "model.safetensors"))
  msg = one_error(capsys, load(bad))
  assert f"tensor {name} is uint8 [31, 3, 2, 8], but config.json implies uint8 " \
         "[32, 3, 2, 8]" in msg

  cfg = json.load(open(os.path.join(good, "config.json")))
  cfg["quantization"] = "int8"  # the int4 bytes read as int8 codes
  (bad / "config.json").write_text(json.dumps(cfg))
  save_file(stored(good), str(bad / "model.safetensors"))
  assert "config.json implies int8" in one_error(capsys, load(bad))
  cfg["quantization"] = "int3"
  (bad / "config.json").write_text(json.dumps(cfg))
  assert "quantization 'int3'" in one_error(capsys, load(bad))
  cfg["quantization"] = None  # quantized tensors in an unquantized export
  (bad / "config.json").write_text(json.dumps(cfg))
  assert "is not part of the model" in one_error(capsys, load(bad))


def test_without_qwix_export_and_load_are_one_line_naming_the_extra(runs, tmp_path,
                                                                    capsys, monkeypatch):
  workdir = runs("flylora")
  out = str(tmp_path / "export")
  ex.export(workdir, out, quantize="int8")
  monkeypatch.setitem(__import__("sys").modules, "qwix", None)  # import qwix fails
  hint = "pip install 'vesperjax[quantize]'"
  msg = one_error(capsys, ex.main(["export", f"--workdir={workdir}",
                                   f"--out={tmp_path / 'again'}", "--quantize=int4"]))
  assert hint in msg and not (tmp_path / "again").exists()
  assert hint in one_error(capsys, gen.main(["generate", "--prompt=x", f"--model={out}"]))
