"""Shared fixtures: a local Ray instance per test module and two tiny models built on disk: the demo's (a character
tokenizer with its own pad token and no chat template) and one as users bring them (byte-level BPE, pad is EOS,
a ChatML chat template).

Two tiers, split by one marker: `pytest -m "not slow"` (make test-fast) runs the math, config, data, batch, CLI
and manifest tests with no Ray, vLLM or DeepSpeed start; `make test` runs everything. A test that asks for a Ray
instance must be marked slow, which collection checks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import relay.cluster  # noqa: F401 - sets RAY_AUTH_MODE=token before Ray loads its configuration
from relay.config import RelayConfig, load_config
from relay.placement import engine_placement, placed_roles, role_placement

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


# The demo config cut down to seconds: few prompts, short responses, no warm start.
TINY_RUN_OVERRIDES = [
    "run.iterations=2",
    "run.eval_every=0",
    "run.checkpoint_every=0",
    "data.train_prompts=256",
    "data.prompts_per_iteration=8",
    "data.eval_prompts=8",
    "data.eval_samples_per_prompt=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "policy.micro_batch_size=4",
    "critic.micro_batch_size=4",
    "algorithm.mini_batches=1",
    "warm_start=null",
]


def tiny_run_overrides(output_dir: Path, *overrides: str) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={Path(output_dir).name}", *TINY_RUN_OVERRIDES, *overrides]


def tiny_run_config(output_dir: Path, *overrides: str) -> RelayConfig:
    return load_config(DEMO_CONFIG, tiny_run_overrides(output_dir, *overrides))


def pytest_collection_modifyitems(items):
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that start Ray must be marked slow (the fast tier runs without it): {unmarked}")


# Module scope: a local instance must not outlive its module, or its dashboard agent would still hold the default
# agent ports when tests/test_cluster.py and tests/test_autoscaling.py start real clusters (whose job API then
# answers "No available agent").
@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=8, namespace="relay-tests", include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from relay.config import TinyModelSection
    from relay.models import build_tiny_model
    from relay.tasks import get_task

    path = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_model(TinyModelSection(), get_task("reverse").alphabet, path, seed=0)


# ChatML, as Qwen writes it, behind a Llama-3-style BOS: the turn end <|im_end|> is the tokenizer's EOS.
BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_model(path: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer trained offline on a few hundred lines of `reverse` chats and words (320 tokens;
    BOS <|begin_of_text|> prepended, EOS <|im_end|>, no pad token, BPE_CHAT_TEMPLATE) and a random-init Llama of
    its vocabulary (hidden 128 over 2 heads of 64, vLLM's CPU attention needs that; 2 layers), saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from relay.config import TinyModelSection
    from relay.models import save_random_model, tiny_model_config

    rng = random.Random(seed)
    words = ["reverse", "the", "digits", "answer", "is", "please", "number", "thanks"]
    lines = []
    for _ in range(300):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        lines.append(f"<|im_start|>user\nreverse {digits}=<|im_end|>\n<|im_start|>assistant\n{digits[::-1]}<|im_end|>")
        lines.append(" ".join(rng.choice(words) for _ in range(8)))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = BPE_CHAT_TEMPLATE
    assert tokenizer.pad_token is None
    return save_random_model(tiny_model_config(TinyModelSection(max_position_embeddings=256), tokenizer), tokenizer,
                             path, seed)


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory) -> Path:
    return build_bpe_model(tmp_path_factory.mktemp("models") / "bpe")


def run_placement_groups(config: RelayConfig) -> list[tuple[str, list[dict[str, float]]]]:
    """Every placement group a run creates at start, as (strategy, bundles): one per engine, one per role that
    does not share the policy's."""
    engine = engine_placement(config)
    groups = [(engine.strategy, engine.bundles)] * config.rollout.num_workers
    for role in placed_roles(config):
        placement = role_placement(config, role)
        if not placement.colocated:
            groups.append((placement.strategy, placement.bundles))
    return groups
