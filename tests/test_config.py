from pathlib import Path

import pytest

from relay.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.samples_per_iteration > 0


def test_gpu_configs_ask_for_gpus():
    for name in ("qwen2.5-1.5b-1node.yaml", "llama3-8b-multinode.yaml"):
        config = load_config(CONFIGS / name)
        assert config.device == "cuda"
        assert config.policy.resources.gpus_per_node >= 1
        assert config.policy.model and config.tiny_model is None
    multinode = load_config(CONFIGS / "llama3-8b-multinode.yaml")
    assert multinode.policy.resources.num_nodes > 1
    assert multinode.policy.zero_stage == 3


def test_the_gpu_recipes_ask_for_the_gpus_their_headers_name():
    from relay.placement import resource_shortfall
    from tests.conftest import run_placement_groups

    def gpus(config) -> float:
        return sum(bundle.get("GPU", 0.0) for _, bundles in run_placement_groups(config) for bundle in bundles)

    small = load_config(CONFIGS / "qwen2.5-0.5b-grpo-2gpu.yaml")  # critic-free: no critic GPU is asked for
    assert not small.algorithm.uses_critic and gpus(small) == 2
    assert resource_shortfall(small, {"CPU": 16.0, "GPU": 2.0}) is None
    large = load_config(CONFIGS / "qwen2.5-7b-ppo-1node.yaml")
    assert gpus(large) == 8 and resource_shortfall(large, {"CPU": 64.0, "GPU": 8.0}) is None


def test_overrides_parse_yaml_values():
    config = load_config(CONFIGS / "demo.yaml", ["algorithm.kl_coef=0.5", "rollout.num_workers=2", "algorithm.value_clip=null"])
    assert config.algorithm.kl_coef == 0.5
    assert config.rollout.num_workers == 2
    assert config.algorithm.value_clip is None


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(ConfigError, match=r"algorithm\.kl_coeff: unknown key"):
        load_config(CONFIGS / "demo.yaml", ["algorithm.kl_coeff=0.1"])


def test_bad_value_names_field_and_file():
    with pytest.raises(ConfigError, match=r"demo\.yaml[\s\S]*rollout\.temperature: Input should be greater than 0"):
        load_config(CONFIGS / "demo.yaml", ["rollout.temperature=0"])


def test_batch_must_split_over_learner_ranks():
    with pytest.raises(ConfigError, match="must divide evenly into policy"):
        load_config(CONFIGS / "demo.yaml", ["policy.resources.cpu_ranks_per_node=3"])


def test_exactly_one_policy_source():
    with pytest.raises(ConfigError, match="exactly one of policy.model"):
        load_config(CONFIGS / "demo.yaml", ["policy.model=gpt2"])
    with pytest.raises(ConfigError, match="exactly one of policy.model"):
        load_config(None, [])


def test_generating_ahead_excludes_dynamic_sampling():
    assert load_config(CONFIGS / "demo.yaml", ["rollout.generate_ahead=true"]).rollout.generate_ahead
    with pytest.raises(ConfigError, match="rollout.generate_ahead cannot be used with algorithm.dynamic_sampling"):
        load_config(CONFIGS / "demo.yaml", ["rollout.generate_ahead=true", "algorithm.advantage=grpo",
                                            "algorithm.dynamic_sampling=true"])


def test_device_and_gpus_agree():
    with pytest.raises(ConfigError, match="policy.resources.gpus_per_node must be >= 1 with device: cuda"):
        load_config(CONFIGS / "demo.yaml", ["device=cuda"])


def test_reward_model_needs_a_path():
    with pytest.raises(ConfigError, match="set reward.model, or reward_model_training"):
        load_config(CONFIGS / "demo.yaml", ["reward.type=model"])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(CONFIGS / "demo.yaml", ["algorithm.kl_coef"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_reusing_the_scoring_forward_needs_one_mini_batch_and_zero_2():
    load_config(CONFIGS / "demo.yaml", ["algorithm.reuse_scoring_forward=true", "algorithm.mini_batches=1"])
    with pytest.raises(ConfigError, match=r"reuse_scoring_forward needs mini_batches 1"):
        load_config(CONFIGS / "demo.yaml", ["algorithm.reuse_scoring_forward=true", "algorithm.mini_batches=2"])
    with pytest.raises(ConfigError, match=r"reuse_scoring_forward needs policy.zero_stage and critic.zero_stage 2"):
        load_config(CONFIGS / "demo.yaml", ["algorithm.reuse_scoring_forward=true", "algorithm.mini_batches=1",
                                            "policy.zero_stage=3"])


def test_a_truncated_sampler_is_refused_with_the_reason():
    # vLLM's log-probs of a top-p sample are of the truncated distribution; the learner's are not (a biased ratio).
    with pytest.raises(ConfigError, match=r"rollout\.top_p 0\.9: PPO needs the learner's log-probs of the distribution"):
        load_config(CONFIGS / "demo.yaml", ["rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match=r"rollout\.top_k: unknown key"):
        load_config(CONFIGS / "demo.yaml", ["rollout.top_k=50"])
    assert load_config(CONFIGS / "demo.yaml", ["rollout.top_p=1.0"]).rollout.top_p == 1.0


RULES = ["reward.type=rules", "reward.rules=[{check: exact_match, column: answer}, {check: regex, pattern: '\\d+'}]"]


def test_prompt_columns_must_hold_the_rules_columns():
    config = load_config(CONFIGS / "demo.yaml", RULES)
    with pytest.raises(ValueError) as error:
        config.check_prompt_columns({"solution": "4", "level": 1}, "data/math.jsonl")
    assert str(error.value) == ("reward.rules: no column 'answer' in data/math.jsonl (its columns besides the prompt: "
                                "level, solution)")
    with pytest.raises(ValueError, match=r"in data/math\.jsonl \(its columns besides the prompt: none\)$"):
        config.check_prompt_columns([], "data/math.jsonl")
    load_config(CONFIGS / "demo.yaml").check_prompt_columns([], "data/math.jsonl")  # no rules, no column needed


def test_a_reference_answer_metric_needs_the_answer_column():
    config = load_config(CONFIGS / "demo.yaml", ["run.early_stop.metric=eval/chrf", "eval.answer_key=target"])
    with pytest.raises(ValueError) as error:
        config.check_prompt_columns(iter(["answer", "id"]), "held-out.jsonl")  # any iterable of names will do
    assert str(error.value) == ("run.early_stop.metric eval/chrf needs reference answers, and the held-out prompts "
                                "have no column 'target' (eval.answer_key); their columns besides the prompt: "
                                "answer, id")
    config.check_prompt_columns(["target"], "held-out.jsonl")
    load_config(CONFIGS / "demo.yaml").check_prompt_columns([], "held-out.jsonl")  # eval/score needs no answers


def test_prompt_columns_that_hold_everything_pass():
    config = load_config(CONFIGS / "demo.yaml", [*RULES, "run.early_stop.metric=eval/bleu"])
    assert config.check_prompt_columns({"answer": "12", "id": 3}, "data/math.jsonl") is None


def test_the_checks_across_sections_run_in_order():
    # Each is a validator of its own; the first written that fails is the error, as in the one validator they were.
    with pytest.raises(ConfigError, match="exactly one of policy.model") as error:
        load_config(CONFIGS / "demo.yaml", ["policy.model=gpt2", "device=cuda", "rollout.max_new_tokens=4096"])
    assert "gpus_per_node" not in str(error.value)
    with pytest.raises(ConfigError, match="policy.resources.gpus_per_node must be >= 1") as error:
        load_config(CONFIGS / "demo.yaml", ["device=cuda", "rollout.max_new_tokens=4096"])
    assert "max_new_tokens" not in str(error.value)
