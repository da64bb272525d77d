"""benchmarks/beta_full_size.py: RxT-Beta at its published size. The full-size run takes a
5.9 GB checkpoint and minutes of CPU, so the suite runs the same code paths on the small
``beta_published_fast`` fixture (Beta's shape options, written by RxLM 0.3.93), and checks that
the full-size tensor list is RxLM's layout and loads into our model, without allocating it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.beta_full_size import BETA_SPEC, published_config, read_spec
from rxruntime.models import RxTModel, native
from rxruntime.models.checkpoint import load_config
from rxruntime.models.rxlm_format import rxlm_weights

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "rxlm" / "0.3.93" / "beta_published_fast"


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def test_the_full_size_tensor_list_is_rxlms_layout_and_fits_our_model(tmp_path: Path) -> None:
    full = read_spec(BETA_SPEC)
    small = read_spec(FIXTURE / "model.safetensors")  # RxLM's own save_pretrained, same options
    assert {_pattern(n) for n in full} == {_pattern(n) for n in small}
    (tmp_path / "config.json").write_text(json.dumps(published_config()))
    config = load_config(tmp_path)
    assert (config.num_layers, config.stm_size, config.dim, config.decoder.num_experts) == (21, 4096, 512, 384)
    tensors = {n: torch.empty(shape, dtype=torch.bfloat16, device="meta") for n, (_, shape) in full.items()}
    weights, unknown = rxlm_weights(tensors, config)
    assert not unknown
    with torch.device("meta"):
        model = RxTModel(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: ours[k] for k in weights}
    assert {k for k, _ in model.named_parameters()} <= weights.keys()
    weights_only = [t for n, t in tensors.items() if ".rope." not in n and not n.endswith("stm.memory")]
    assert 2.9e9 < sum(t.numel() for t in weights_only) < 3.0e9  # both embeddings, as RxLM saves them


def test_the_script_measures_a_small_model_with_betas_options(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    args = ["--config", str(FIXTURE / "config.json"), "--spec", str(FIXTURE / "model.safetensors")]
    args += ["--out", str(tmp_path / "ckpt"), "--json", str(out), "--threads", "1", "--min-available-gib", "0"]
    args += ["--system-tokens", "12", "--query-tokens", "10", "--batch-query-tokens", "6", "--answer-tokens", "5"]
    args += ["--batch", "3", "--idle-conversations", "2", "--store-repeats", "2"]
    script = ROOT / "benchmarks" / "beta_full_size.py"
    for dtype in ("bf16", "int8"):  # the second run reuses the checkpoint, with the C step's int8
        run = subprocess.run(
            [sys.executable, str(script), *args, "--dtype", dtype], capture_output=True, text=True, cwd=ROOT
        )
        assert run.returncode == 0, run.stderr[-3000:]
    assert "decode tok/s, 3 conversations" in run.stdout
    result = json.loads(out.read_text())
    assert result["checkpoint"]["reused"] is True
    ours = result["rxruntime"]
    assert ours["weights"] == "int8" and ours["c_decode_step"] is native.enabled()
    need = ours["decode_bytes_per_token"]
    assert need["total"] == sum(v for k, v in need.items() if k != "total") and need["experts"] > 0
    assert ours["read_bandwidth_bytes_per_s"] > 0 and "MB read per token" in run.stdout
    config = json.loads((FIXTURE / "config.json").read_text())["decoder_config"]
    values = config["num_layers"] * config["stm_size"] * config["embed_dim"]
    assert (ours["stm"]["float32_bytes"], ours["stm"]["bfloat16_bytes"]) == (4 * values, 2 * values)
    assert ours["system_prompt"]["ids"] == 12 + 5  # [BOS][I] title (2 words) \n\n text [EOS]
    assert ours["b1"]["tokens"] == 5 and ours["b3"]["tokens"] == 15  # [EOS] is unreachable
    assert set(ours["stores"]) == {"sqlite-float32", "sqlite-bfloat16", "redis-float32", "redis-bfloat16"}
    assert ours["stores"]["redis-bfloat16"]["bytes"] < ours["stores"]["redis-float32"]["bytes"]
    assert ours["load_s"] > 0 and ours["rss_bytes"] > 0 and result["machine"]["cpu"]
    assert result["rxlm"] is None  # RxLM's side runs only in its own environment (--rxlm)


def test_the_stores_alone_are_timed_without_a_model(tmp_path: Path) -> None:
    out = tmp_path / "stores.json"
    args = ["--stores-only", "--config", str(FIXTURE / "config.json"), "--store-repeats", "1", "--json", str(out)]
    script = ROOT / "benchmarks" / "beta_full_size.py"
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    config = json.loads((FIXTURE / "config.json").read_text())["decoder_config"]
    assert result["stm_shape"] == [config["num_layers"], config["stm_size"], config["embed_dim"]]
    sizes = {name: s["bytes"] for name, s in result["stores"].items()}
    assert sizes["sqlite-bfloat16"] < sizes["sqlite-float32"] and sizes["redis-bfloat16"] < sizes["redis-float32"]
