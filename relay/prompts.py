"""PPO's prompts: rows of a dataset (or of a built-in task), checked, rendered and tokenized, then drawn by the driver.

    data.prompts: jsonl/parquet file | directory of them | saved Hugging Face dataset | Hub name (data.split, data.subset)

A row holds its prompt as a string under `data.prompt_key`, or as chat messages under `data.messages_key`
(rendered with the chat template and the generation prompt; with `data.apply_chat_template` a plain prompt becomes
one user message). Every other column is the row's metadata, handed with each of its samples to the reward
(answers, test cases, source). A built-in task is one way to make such rows: `task_rows` gives them, and
`relay export-task` writes them to parquet, which trains exactly as the task does.

Held-out prompts come from `data.eval_data` (a file or directory, or a split of `data.prompts`), at most
`data.eval_prompts` of them (a seeded sample); without it, `data.eval_prompts` rows of `data.prompts` are held out
and never trained on.

Local data is checked whole when it is loaded, before Ray starts: a bad row is an error naming its file and line.
A Hub dataset stays memory-mapped on disk: `data.check_rows` rows (a seeded sample) are checked up front and the
others as they are drawn, where a bad row is skipped, counted and reported. A prompt longer than the engine can
take (`rollout.max_model_len - rollout.max_new_tokens` tokens) is dropped, or truncated to its last tokens,
as `data.long_prompts` says; both are counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from transformers import PreTrainedTokenizerBase

from relay.config import DataSection, RelayConfig
from relay.data import (
    check_messages,
    check_text,
    dataset_row_where,
    is_saved_dataset,
    open_dataset,
    read_rows,
    render_chat,
    tokenize_prompt,
)
from relay.tasks import Task, split_examples, task_of


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt as rendered (chat template applied): what reward functions and endpoints see
    ids: list[int]  # the token ids the engine is given (the last ones only, when truncated)
    metadata: dict[str, Any]  # the row's other columns


@dataclass
class PromptCounts:
    """What loading and drawing prompts had to leave out or cut, for the log and the metrics."""

    dropped: int = 0  # longer than the engine's limit, with data.long_prompts: drop
    truncated: int = 0  # longer than the engine's limit, cut to their last tokens
    bad_rows: int = 0  # malformed rows of a Hub dataset, found as they were drawn and skipped


@dataclass
class PromptParser:
    """One row -> a Prompt (or None when it is too long and dropped); a malformed row raises ValueError naming it."""

    data: DataSection
    tokenizer: PreTrainedTokenizerBase
    max_prompt_tokens: int
    counts: PromptCounts = field(default_factory=PromptCounts)

    def __call__(self, row: Any, where: str) -> Prompt | None:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with a {self.data.prompt_key!r} key, got {type(row).__name__}")
        text = self.render(row, where)
        metadata = {key: value for key, value in row.items() if key not in (self.data.prompt_key, self.data.messages_key)}
        ids = tokenize_prompt(self.tokenizer, text)
        if len(ids) > self.max_prompt_tokens:
            if self.data.long_prompts == "drop":
                self.counts.dropped += 1
                return None
            self.counts.truncated += 1
            ids = ids[-self.max_prompt_tokens :]
        return Prompt(text=text, ids=ids, metadata=metadata)

    def render(self, row: dict[str, Any], where: str) -> str:
        data = self.data
        if data.messages_key is not None and row.get(data.messages_key) is not None:
            messages = check_messages(row[data.messages_key], data.messages_key, where)
            return render_chat(messages, self.tokenizer, data.chat_template, where, add_generation_prompt=True,
                               template_setting="data.chat_template")
        if data.prompt_key not in row:
            chats = f" or {data.messages_key!r}" if data.messages_key else ""
            raise ValueError(f"{where}: missing key {data.prompt_key!r} (rows need {data.prompt_key!r}{chats}; "
                             "data.prompt_key / data.messages_key name other columns)")
        prompt = check_text(row[data.prompt_key], data.prompt_key, where)
        if data.apply_chat_template:
            return render_chat([{"role": "user", "content": prompt}], self.tokenizer, data.chat_template, where,
                               add_generation_prompt=True, template_setting="data.chat_template")
        return prompt


class LazyPrompts:
    """Rows of a memory-mapped Hugging Face dataset, parsed when drawn; `indices` picks (and orders) the rows."""

    def __init__(self, dataset: Any, name: str, split: str, parser: PromptParser, indices: list[int]) -> None:
        self.dataset, self.name, self.split, self.parser, self.indices = dataset, name, split, parser, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int) -> Prompt | None:
        """The prompt at `position`, or None when it was dropped as too long or skipped as malformed."""
        index = self.indices[position]
        try:
            return self.parser(self.dataset[index], dataset_row_where(self.name, self.split, index))
        except ValueError as error:
            self.parser.counts.bad_rows += 1
            print(f"data: skipping a malformed row: {error}", flush=True)
            return None


class PromptList:
    """Prompts checked whole up front: local files and generated tasks."""

    def __init__(self, prompts: list[Prompt]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, position: int) -> Prompt:
        return self.prompts[position]


@dataclass
class PromptData:
    train: PromptList | LazyPrompts
    eval: list[Prompt]
    counts: PromptCounts
    source: str  # what the prompts are, for the log and summary.json


def max_prompt_tokens(config: RelayConfig) -> int:
    return config.rollout.max_model_len - config.rollout.max_new_tokens


def load_prompt_data(config: RelayConfig, tokenizer: PreTrainedTokenizerBase) -> PromptData:
    """The training and held-out prompts of a run; a bad row or an empty source raises ValueError naming it."""
    data = config.data
    parser = PromptParser(data, tokenizer, max_prompt_tokens(config))
    task = task_of(data)
    if task is not None:
        train_rows, eval_rows = task_rows(task, data)
        train = PromptList(parse_all(parser, train_rows, f"task {data.task}"))
        held_out = parse_all(parser, eval_rows, f"task {data.task} (held out)")
        source = f"task {data.task}"
    else:
        assert data.prompts is not None
        train, held_out = load_dataset_prompts(data, parser)
        source = data.prompts
    if not held_out:
        raise ValueError(f"data: no held-out prompt is left of {source} (all dropped as too long?)")
    return PromptData(train=train, eval=held_out, counts=parser.counts, source=source)


def task_rows(task: Task, data: DataSection) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """A task's generated examples as dataset rows, (where, row) for training and held out."""
    train, held_out = split_examples(task, data.train_prompts, data.eval_prompts, data.seed)

    def rows(examples, part):
        return [(f"task {task.name} {part} example {index}", {data.prompt_key: example.prompt, **example.metadata})
                for index, example in enumerate(examples)]

    return rows(train, "training"), rows(held_out, "held-out")


def parse_all(parser: PromptParser, rows: Iterable[tuple[str, Any]], source: str) -> list[Prompt]:
    prompts = [prompt for where, row in rows if (prompt := parser(row, where)) is not None]
    if not prompts and not parser.counts.dropped:
        raise ValueError(f"{source}: no prompts")
    return prompts


def load_dataset_prompts(data: DataSection, parser: PromptParser) -> tuple[PromptList | LazyPrompts, list[Prompt]]:
    assert data.prompts is not None
    eval_is_split = data.eval_data is not None and not Path(data.eval_data).exists()
    if eval_is_split and is_local(data.prompts):
        raise ValueError(f"data.eval_data {data.eval_data!r} is no file or directory, and data.prompts "
                         f"{data.prompts} is local files, which have no splits")
    if is_local(data.prompts):
        rows = list(read_rows(data.prompts, data.split, data.subset))
        train_rows, eval_rows = rows, []
        if data.eval_data is None:
            order = random.Random(data.seed).sample(range(len(rows)), len(rows))
            held_out = set(order[: min(data.eval_prompts, len(rows) // 2)])
            train_rows = [row for index, row in enumerate(rows) if index not in held_out]
            eval_rows = [rows[index] for index in sorted(held_out)]
        train: PromptList | LazyPrompts = PromptList(parse_all(parser, train_rows, data.prompts))
    else:
        dataset = open_dataset(data.prompts, data.split, data.subset)
        indices = list(range(len(dataset)))
        if data.eval_data is None:
            held_out = set(random.Random(data.seed).sample(indices, min(data.eval_prompts, len(indices) // 2)))
            eval_rows = [(dataset_row_where(data.prompts, data.split, i), dataset[i]) for i in sorted(held_out)]
            indices = [index for index in indices if index not in held_out]
        train = LazyPrompts(dataset, data.prompts, data.split, parser, indices)
        check_sample(train, data, parser)
    if data.eval_data is not None:
        eval_rows = sample_rows(read_rows(*eval_source(data)),
                                data.eval_prompts, data.seed)
    if not len(train):
        raise ValueError(f"{data.prompts}: no training prompts")
    return train, parse_all(parser, eval_rows, data.eval_data or f"{data.prompts} (held out)")


def eval_source(data: DataSection) -> tuple[str, str, str | None]:
    """(source, split, subset) of data.eval_data for read_rows: a file or directory of its own, or else a split
    of data.prompts."""
    assert data.eval_data is not None and data.prompts is not None
    if Path(data.eval_data).exists():
        return data.eval_data, data.split, None
    return data.prompts, data.eval_data, data.subset


def is_local(source: str) -> bool:
    """A file or a directory of files: read and checked whole. A saved dataset or a Hub name stays on disk."""
    path = Path(source)
    return path.is_file() or (path.is_dir() and not is_saved_dataset(path))


def check_sample(prompts: LazyPrompts, data: DataSection, parser: PromptParser) -> None:
    """Up to data.check_rows rows of a Hub dataset, checked before Ray starts: a bad one is an error here."""
    positions = random.Random(data.seed).sample(range(len(prompts)), min(data.check_rows, len(prompts)))
    for position in positions:
        index = prompts.indices[position]
        parser(prompts.dataset[index], dataset_row_where(prompts.name, prompts.split, index))
    parser.counts = PromptCounts()  # the sample is drawn again in training and counted then


def sample_rows(rows: Iterator[tuple[str, Any]], count: int, seed: int) -> list[tuple[str, Any]]:
    """At most `count` of `rows`, a seeded sample kept in their order."""
    everything = list(rows)
    if len(everything) <= count:
        return everything
    chosen = sorted(random.Random(seed).sample(range(len(everything)), count))
    return [everything[index] for index in chosen]


def data_alphabet(config: RelayConfig) -> str:
    """Every character a tiny model's tokenizer must know: the task's alphabet, or every character of the data
    (prompts, metadata and chat messages of data.prompts and data.eval_data, and the warm start's data)."""
    task = task_of(config.data)
    if task is not None:
        return task.alphabet
    data = config.data
    sources = [(data.prompts, data.split, data.subset)]
    if data.eval_data is not None:
        sources.append(eval_source(data))
    if config.warm_start is not None and config.warm_start.data is not None:
        sources.append((config.warm_start.data, "train", None))
    characters: set[str] = set(config.chat_template or "")
    for source, split, subset in sources:
        for _, row in read_rows(source, split, subset):
            characters |= set("".join(strings_in(row)))
    return "".join(sorted(characters))


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)


def export_task(task: Task, data: DataSection, out_dir: Path) -> dict[str, Path]:
    """Write a task's prompts as a dataset: train.parquet and eval.parquet (the `prompt` column and the metadata
    columns, exactly the rows `data.task` trains and evaluates on) and demonstrations.jsonl (prompt/response rows
    for `warm_start.data`, one per training prompt). Existing files are never overwritten."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    train, held_out = split_examples(task, data.train_prompts, data.eval_prompts, data.seed)
    paths = {name: out_dir / name for name in ("train.parquet", "eval.parquet", "demonstrations.jsonl")}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing:
        raise ValueError(f"not overwriting {', '.join(existing)}; choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(data.seed)
    contents = {
        "train.parquet": [{"prompt": example.prompt, **example.metadata} for example in train],
        "eval.parquet": [{"prompt": example.prompt, **example.metadata} for example in held_out],
        "demonstrations.jsonl": [demonstration_row(example.prompt, task.demonstrate(example, rng))
                                 for example in train],
    }
    for name, rows in contents.items():
        partial = paths[name].with_name(paths[name].name + ".partial")
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), partial)
        else:
            partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        partial.rename(paths[name])
    return paths


def demonstration_row(prompt: str, shown: str | list[tuple[str, str]]) -> dict[str, Any]:
    """A warm start's row: prompt and response, or a multi-turn episode as chat messages."""
    if isinstance(shown, str):
        return {"prompt": prompt, "response": shown}
    return {"messages": [{"role": "user", "content": prompt}, *({"role": role, "content": text} for role, text in shown)]}
