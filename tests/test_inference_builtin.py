"""autopar's built-in GPT and Llama on the paged engine (the captured graph with the paged-attention pass, and
the module-by-module path of autopar.inference.builtin that tensor-parallel decoding uses): greedy outputs equal a
plain greedy loop that reruns the whole model on the whole sequence every step (the model's own forward,
its own positions and attention), for prompts of different lengths with chunked prefill and a cache small
enough to preempt; other modules are refused."""
from __future__ import annotations

import pytest
import torch

from autopar.core.errors import ConfigError
from autopar.inference import Engine, EngineConfig, SamplingParams
from autopar.models import build_model


def plain_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_builtin_greedy_equals_the_plain_model(spec):
    torch.manual_seed(0)
    model, _ = build_model(spec, batch=1, seq=8, device="cpu")
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 5, 13, 30)]
    max_new = 12
    want = [plain_greedy(model, p, max_new) for p in prompts]
    # 6 blocks of 8 slots: fewer than the four requests need at once, so some wait or are preempted
    eng = Engine(model, EngineConfig(block_size=8, num_blocks=6, max_num_seqs=4, max_tokens_per_step=16,
                                     prefill_chunk=8))
    assert eng.runner.path == "graph"
    got = eng.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    assert [o.token_ids for o in got] == want
    assert sum(o.num_preemptions for o in got) > 0, "the cache was meant to be too small for all four at once"
    mod = Engine(model, EngineConfig(block_size=8, num_blocks=6, max_num_seqs=4, max_tokens_per_step=16,
                                     prefill_chunk=8, runner_path="modules"))
    assert [o.token_ids for o in mod.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True))] == want


def test_other_modules_are_refused():
    with pytest.raises(ConfigError, match="built-in GPT and Llama"):
        Engine(torch.nn.Linear(4, 4), EngineConfig(block_size=8, num_blocks=4))
