"""Tier 2: `relay serve --follow` on Ray Serve LLM with vLLM, serving a run directory whose config names a chat
template, its checkpoint saved as a learner saves one (with the run's tokenizer, which carries the template): both
OpenAI endpoints answer as greedy decoding of the same weights does, streaming too; a malformed request gets a 4xx
with a clear message; without the API key nothing is answered; a newer checkpoint is picked up while requests keep
coming, none dropped."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

import jobs.serve
from jobs.serve import resolve, start
from relay.config import dump_config
from relay.models import load_tokenizer
from relay.zero import save_pretrained
from tests.conftest import tiny_run_config
from tests.live_ray import free_port

pytestmark = pytest.mark.slow

API_KEY = "test-key"
PROMPTS = ["31415=", "2718=", "16180=", "4669="]
# Renders a chat as BOS and its messages' text, so that a chat turn and the same completion prompt are the same
# tokens (a chat template writes the special tokens itself; the completion prompt gets the tokenizer's BOS).
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def server(ray_session, tiny_model, tmp_path_factory):
    from ray import serve

    run_dir = tmp_path_factory.mktemp("served") / "run"
    model = run_dir / "checkpoints" / "iter_000001" / "policy"
    config = tiny_run_config(run_dir, f"data.chat_template={json.dumps(CHAT_TEMPLATE)}")
    # As a policy learner saves (relay.zero.save_pretrained): the weights and the run's tokenizer, nothing by hand.
    save_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(str(tiny_model),
                    config.chat_template), zero_stage=2, rank=0, path=model)
    (run_dir / "config.yaml").write_text(dump_config(config))
    poll_s, jobs.serve.FOLLOW_POLL_S = jobs.serve.FOLLOW_POLL_S, 0.5
    try:
        served = resolve(str(run_dir), None, None, "tiny", follow=True)
        assert served.path == str(model.resolve())
        port = free_port()
        start(served, "127.0.0.1", port, API_KEY)
    finally:
        jobs.serve.FOLLOW_POLL_S = poll_s
    yield f"http://127.0.0.1:{port}", model
    serve.shutdown()


def greedy(model_dir, prompts: list[str]) -> list[str]:
    """transformers' greedy decoding of each prompt, 8 new tokens at most, as text."""
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def test_completions_chat_and_streaming_answer_as_greedy_decoding(server):
    address, model = server
    client = OpenAI(base_url=f"{address}/v1", api_key=API_KEY)
    assert [entry.id for entry in client.models.list().data] == ["tiny"]
    expected = greedy(model, PROMPTS)
    completions = [client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
                   .choices[0].text for prompt in PROMPTS]
    assert completions == expected
    chats = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=8, temperature=0).choices[0].message.content
             for prompt in PROMPTS]
    assert chats == expected
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected[0]


def test_a_malformed_request_gets_a_4xx_and_no_key_gets_a_401(server):
    address, _ = server

    def post(body: dict, key: str | None = API_KEY) -> tuple[int, str]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{address}/v1/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    status, text = post({"model": "tiny"})  # no prompt
    assert 400 <= status < 500 and "prompt" in json.loads(text)["error"]["message"]
    status, text = post({"model": "tiny", "prompt": "1=", "max_tokens": -3})
    assert 400 <= status < 500 and "max_tokens" in text
    assert post({"model": "tiny", "prompt": "1="}, key=None)[0] == 401
    assert post({"model": "tiny", "prompt": "1="}, key="wrong")[0] == 401
    assert post({"model": "tiny", "prompt": "1=", "max_tokens": 2})[0] == 200


def test_follow_loads_a_newer_checkpoint_without_dropping_a_request(server):
    address, model = server
    client = OpenAI(base_url=f"{address}/v1", api_key=API_KEY, max_retries=0)
    before = greedy(model, PROMPTS)
    # A newer policy (the output layer moved), published as the trainer publishes a checkpoint: whole, by a rename.
    newer = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    with torch.no_grad():
        weight = newer.get_output_embeddings().weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 2)
    checkpoints = model.parent.parent
    partial = checkpoints / "iter_000002.partial"
    newer.save_pretrained(partial / "policy")
    load_tokenizer(str(model)).save_pretrained(partial / "policy")
    after = greedy(partial / "policy", PROMPTS)
    assert after != before

    def ask(index: int) -> tuple[int, str]:
        prompt = index % len(PROMPTS)
        stream = client.completions.create(model="tiny", prompt=PROMPTS[prompt], max_tokens=8, temperature=0,
                                           stream=True)
        return prompt, "".join(chunk.choices[0].text for chunk in stream)

    answers: list[tuple[int, str]] = []
    with ThreadPoolExecutor(4) as pool:
        os.replace(partial, checkpoints / "iter_000002")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batch = list(pool.map(ask, range(len(answers), len(answers) + 8)))  # raises if one is dropped
            answers += batch
            if [text for _, text in batch[-len(PROMPTS):]] == after:
                break
    # Every request got a whole answer, of the one policy or of the other; the last ones are the newer policy's.
    assert all(text in (before[prompt], after[prompt]) for prompt, text in answers)
    assert [text for _, text in answers[-len(PROMPTS):]] == after
