"""CUDA-only behaviour: bf16 decoding, the memory update on its own stream. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from rxruntime import Engine
from rxruntime.models import RxTModel, RxTokenizer, SamplingParams, generate

from .conftest import tiny_config

pytestmark = pytest.mark.gpu


def _model(dtype: torch.dtype) -> RxTModel:
    torch.manual_seed(0)
    return RxTModel(tiny_config(vocab_size=300)).to("cuda", dtype).eval()


def test_bf16_cache_decoding_matches_full_forward_on_cuda() -> None:
    model = _model(torch.bfloat16)
    stm = model.init_stm(2, torch.Generator(device="cuda").manual_seed(0))
    ids = torch.randint(7, 300, (2, 16), device="cuda")
    with torch.no_grad():
        full = model.decoder_logits(ids, stm).float()
        cache, kv = model.new_cache(2), model.memory_kv(stm)
        model.prefill(ids[:, :4], torch.full((2,), 4, device="cuda"), kv, cache)
        for t in range(4, 16):
            step = model.decode_step(ids[:, t], torch.full((2,), t, device="cuda"), kv, cache).float()
            assert (step - full[:, t]).norm() / full[:, t].norm() < 2e-2


def test_cpu_and_cuda_agree_on_greedy_tokens_in_fp32() -> None:
    cpu = RxTModel(tiny_config(vocab_size=300)).eval()
    gpu = RxTModel(tiny_config(vocab_size=300)).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    stm = cpu.init_stm(1, torch.Generator().manual_seed(1), std=1.0)
    prompt = [[2, 4, 10, 11, 12, 5]]
    greedy = SamplingParams(temperature=0.0)
    assert generate(cpu, stm, prompt, greedy, 8) == generate(gpu, stm.cuda(), prompt, greedy, 8)


def test_engine_runs_the_memory_update_on_its_own_stream() -> None:
    tok = RxTokenizer.train(["Hi, I'm Ada and my cat is called Pixel."] * 30, vocab_size=300)
    with Engine(_model(torch.bfloat16), tok) as eng:
        assert eng._memory._stream is not None and eng._memory._stream != torch.cuda.default_stream()
        conv = eng.conversation("c")
        conv.ask("Hi", max_new_tokens=4)
        conv.ask("Again", max_new_tokens=4)  # waits on the CUDA event, not on the host
        assert conv.wait_for_memory(10) and conv.stm_version == 2
        assert isinstance(eng._sched.conversations["c"].ready_event, torch.cuda.Event)
