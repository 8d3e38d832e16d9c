"""``autopar.inference.LLM``, ``autopar generate`` and the OpenAI-compatible server, the latter started by the
test with uvicorn on 127.0.0.1 and driven by a real HTTP client (httpx): concurrent streaming clients,
a client that disconnects, bad sampling parameters, a too-long prompt beside a good one, text prompts
through a tokenizer built in the test."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from autopar.core.errors import MeshError
from autopar.inference import Engine, EngineConfig, SamplingParams
from autopar.inference.api import LLM

transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

WORDS = [f"w{i}" for i in range(64)]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def word_tokenizer():
    """A whitespace word-level HF tokenizer over WORDS (token id = index), built without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2")


def alone(model, prompt, n):
    return Engine(model, EngineConfig(block_size=4, num_blocks=64)).generate(
        [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids


def test_llm_text_prompts_and_mesh_without_plan_refused():
    model, tok = tiny_model(), word_tokenizer()
    llm = LLM(model, tokenizer=tok, block_size=4, num_blocks=40)
    outs = llm.generate(["w5 w9 w13", "w7 " * 20, [3, 4]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert outs[0].token_ids == alone(model, [5, 9, 13], 6)
    assert outs[0].text == " ".join(WORDS[t] for t in outs[0].token_ids)
    assert outs[2].token_ids == alone(model, [3, 4], 6)
    assert list(llm.stream("w5 w9 w13", SamplingParams(max_new_tokens=6, ignore_eos=True))) == outs[0].token_ids
    with pytest.raises(MeshError, match="needs the plan"):
        LLM(model, mesh=(2,))


def test_cli_generate_from_local_dir(tmp_path, capsys):
    from autopar.tools.cli import main
    model, tok = tiny_model(), word_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "w5 w9 w13", "--prompt-ids", "3,4",
               "--max-new-tokens", "5", "--ignore-eos", "--block-size", "4", "--num-blocks", "32", "--json"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [ln["token_ids"] for ln in lines] == [alone(model, [5, 9, 13], 5), alone(model, [3, 4], 5)]
    assert lines[0]["text"] == " ".join(WORDS[t] for t in lines[0]["token_ids"])
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "w1"]) == 1


@pytest.fixture(scope="module")
def server():
    from autopar.inference.server import create_app
    model = tiny_model(seed=1)
    refs = {n: alone(model, list(range(3, 3 + n)), 12) for n in (2, 5, 9, 14)}
    llm = LLM(model, tokenizer=word_tokenizer(), block_size=4, num_blocks=24, max_num_seqs=8)
    app = create_app(llm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", llm, refs
    srv.should_exit = True
    th.join(timeout=10)


def _stream(url, body, out, key):
    toks, reasons = [], []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            ch = json.loads(line[6:])["choices"][0]
            toks += ch["token_ids"]
            reasons.append(ch["finish_reason"])
    out[key] = (toks, reasons)


def _wait_free(url, deadline_s=15):
    end = time.time() + deadline_s
    while time.time() < end:
        st = httpx.get(f"{url}/stats", timeout=10).json()
        if st["free_blocks"] == st["total_blocks"]:
            return st
        time.sleep(0.05)
    return st


def test_concurrent_streaming_clients(server):
    url, _, refs = server
    out = {}
    threads = [threading.Thread(target=_stream, args=(url, {"prompt": list(range(3, 3 + n)), "max_tokens": 12,
                                                            "temperature": 0, "stream": True, "ignore_eos": True},
                                                      out, n)) for n in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for n, ref in refs.items():
        toks, reasons = out[n]
        assert toks == ref and reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    st = _wait_free(url)
    assert st["free_blocks"] == st["total_blocks"]


def test_nonstreaming_text_and_usage(server):
    url, _, refs = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "w3 w4 w5 w6 w7", "max_tokens": 12, "temperature": 0,
                                                  "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    ch = body["choices"][0]
    assert ch["token_ids"] == refs[5] and ch["text"] == " ".join(WORDS[t] for t in refs[5])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_client_disconnect_frees_blocks(server, monkeypatch):
    url, llm, _ = server
    step = llm.engine.step

    def slow_step():                                    # 80 tokens take >= 1.6 s: the request cannot finish
        time.sleep(0.02)                                # before the server sees the client leave
        return step()
    monkeypatch.setattr(llm.engine, "step", slow_step)
    before = llm.engine.generated_tokens
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 80,
                                                             "temperature": 0, "stream": True, "ignore_eos": True},
                      timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 2:
                break                                   # leave mid-stream
    st = _wait_free(url)
    assert st["free_blocks"] == st["total_blocks"]
    assert not llm.engine.has_unfinished()
    assert llm.engine.generated_tokens - before < 80    # aborted, not run to its end


def test_bad_params_and_too_long_prompt(server):
    url, llm, refs = server
    steps = llm.engine.steps
    for bad in ({"temperature": -1}, {"top_p": 2}, {"max_tokens": 0}, {"top_k": "x"}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [3, 4], **bad}, timeout=30)
        assert r.status_code == 400, bad
        assert "error" in r.json() and r.json()["error"]["message"]
    assert llm.engine.steps == steps                    # refused before anything ran
    out = {}
    good = threading.Thread(target=_stream, args=(url, {"prompt": list(range(3, 12)), "max_tokens": 12,
                                                        "temperature": 0, "stream": True, "ignore_eos": True},
                                                  out, "good"))
    good.start()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [3] * 120, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
    good.join(timeout=60)
    assert out["good"][0] == refs[9]
