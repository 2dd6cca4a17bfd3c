"""One typed config tree for a relay run, loaded from YAML plus `dotted.key=value` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["algorithm.kl_coef=0.05", "rollout.num_workers=2"])

Every section forbids unknown keys, and every error names the field's dotted path, so a typo fails at load time,
before any cluster resource is taken.

The package's modules, each importing only those above it:
    base.py       Section (the base of every section), Resources, the Dtype and Device literals
    roles.py      PPO's roles: the learners (with LoRA), the frozen scorers, the reward source, the vLLM engines
    algorithm.py  the RL algorithm
    env.py        the environment of a multi-turn (agent) run
    inputs.py     what a run starts from: prompts or a task, a tiny model, warm start, reward model training
    run.py        the run as a whole: iterations, checkpoints, evaluation and early stop, tracking, Ray
    tree.py       RelayConfig, the root: the checks across sections and those of the prompts' columns
    loading.py    YAML and overrides in (load_config, config_from_command_line), YAML out (dump_config)
Import the names from `relay.config` itself; which module holds one is not part of the interface.
"""

from relay.config.algorithm import AlgorithmSection
from relay.config.base import Device, Dtype, Resources, Section
from relay.config.env import EnvSection
from relay.config.inputs import DataSection, RewardModelSection, TinyModelSection, WarmStartSection
from relay.config.loading import ConfigError, apply_overrides, config_from_command_line, dump_config, load_config
from relay.config.roles import (
    InferenceSection,
    LoraSection,
    RewardRule,
    RewardSection,
    RolloutSection,
    TrainerSection,
)
from relay.config.run import (
    LOWER_IS_BETTER,
    EarlyStopSection,
    EvalMetric,
    EvalSection,
    RaySection,
    RunSection,
    TrackingSection,
)
from relay.config.tree import RelayConfig

__all__ = [
    "LOWER_IS_BETTER",
    "AlgorithmSection",
    "ConfigError",
    "DataSection",
    "Device",
    "Dtype",
    "EarlyStopSection",
    "EnvSection",
    "EvalMetric",
    "EvalSection",
    "InferenceSection",
    "LoraSection",
    "RaySection",
    "RelayConfig",
    "Resources",
    "RewardModelSection",
    "RewardRule",
    "RewardSection",
    "RolloutSection",
    "RunSection",
    "Section",
    "TinyModelSection",
    "TrackingSection",
    "TrainerSection",
    "WarmStartSection",
    "apply_overrides",
    "config_from_command_line",
    "dump_config",
    "load_config",
]
