"""The run as a whole: its name, directory, iterations, checkpoints and restarts, the evaluations and the early
stop they drive, where metrics are tracked, and the Ray cluster it joins."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from relay.config.base import Section


class RaySection(Section):
    address: str | None = Field(None, description="None: the cluster of the job (or RAY_ADDRESS), else local")
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance started by relay")
    namespace: str = "relay"


EvalMetric = Literal["eval/score", "eval/reward", "eval/win_rate", "eval/kl_ref", "eval/perplexity", "eval/bleu",
                     "eval/chrf"]
LOWER_IS_BETTER: frozenset[str] = frozenset({"eval/kl_ref", "eval/perplexity"})


class EvalSection(Section):
    """What an evaluation measures besides the held-out score (in training every run.eval_every iterations, and in
    `relay eval`): the reward source's score, the win rate against the policy PPO started from, the KL to the
    reference, the perplexity of a text set, and BLEU/chrF where the held-out prompts carry reference answers."""

    text_data: str | None = Field(
        None, description="texts for the perplexity: prompt/response or chat `messages` rows (jsonl, parquet, a "
        "dataset); None: warm_start.data, else the task's demonstrations of the held-out prompts"
    )
    text_rows: int = Field(256, ge=1, description="the first this many rows of the text set")
    answer_key: str = Field(
        "answer", description="the held-out prompts' column with a reference answer (BLEU and chrF when present)"
    )


class EarlyStopSection(Section):
    """The evaluation metric that picks the best checkpoint (`<output_dir>/policy_best`) and, with `patience`, ends
    the run when it stops improving."""

    metric: EvalMetric = "eval/score"
    mode: Literal["max", "min"] | None = Field(
        None, description="None: min for eval/kl_ref and eval/perplexity, max for the others"
    )
    patience: int | None = Field(
        None, ge=1, description="evaluations in a row without improvement that end the run; None: never stop early"
    )
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or ("min" if self.metric in LOWER_IS_BETTER else "max")


class RunSection(Section):
    name: str = "relay"
    output_dir: str = Field("runs/relay", description="run directory: metrics, checkpoints, final model")
    iterations: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="evaluate every N iterations (0: only at start and end)")
    early_stop: EarlyStopSection = Field(default_factory=EarlyStopSection)
    checkpoint_every: int = Field(
        10, ge=0, description="checkpoint every N iterations (0: only at the end); restarts resume from the newest"
    )
    max_restarts: int = Field(2, ge=0, description="restarts of every role from the newest checkpoint when one dies")
    max_nonfinite_steps: int = Field(
        10, ge=0, description="non-finite losses (micro-batch trained with zero gradient) and gradients (optimizer "
        "step dropped) a learner skips before the run stops"
    )
    stop_grace_s: int = Field(
        300, ge=3, description="relay submit: how long `relay stop` lets the driver checkpoint before Ray kills it"
    )
    keep_checkpoints: int = Field(0, ge=0, description="keep the newest K checkpoints (0: all)")
    roles_in_parallel: bool = Field(
        True, description="score, and train, the roles at the same time; false: one after another, each with every "
        "core on device cpu (on 2 cores the two took the same time within noise: relay bench)"
    )
    resume: Literal["auto", "never"] = "auto"
    call_timeout_s: float = Field(
        1800.0, gt=0, description="the longest the driver waits on one call to a role before naming it as stuck"
    )
    seed: int = 0


class TrackingSection(Section):
    """Where the metrics go besides metrics.jsonl, TensorBoard and Ray's dashboard: MLflow and Weights & Biases,
    each one run per relay run (a resumed run continues it)."""

    mlflow: bool = Field(False, description="log to MLflow (pip install mlflow-skinny, or relay's `tracking` extra)")
    mlflow_tracking_uri: str | None = Field(
        None, description="an MLflow server or store; None: a local store in <run.output_dir>/mlruns"
    )
    mlflow_experiment: str = "relay"
    wandb: bool = Field(False, description="log to Weights & Biases (pip install wandb, or the `tracking` extra)")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: written under <run.output_dir>/wandb, for `wandb sync` later"
    )
    wandb_project: str = "relay"
