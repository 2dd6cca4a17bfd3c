"""Token in, token out: an episode's text becomes token ids once, and the model's turns are kept as sampled.

The prompt is rendered and tokenised as a single-turn prompt is (chat messages through the template with its
generation prompt); each observation is tokenised once, without special tokens, and appended to the ids the
engine sampled, from which the next turn is generated; nothing is ever re-tokenised. Without a chat template,
messages are rendered by plain concatenation of their contents (the tiny model's case).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from relay.data import IGNORE_INDEX, render_chat, tokenize_prompt
from relay.envs import Observation, Prompt

_ACTION = "RELAY_ACTION_PLACEHOLDER"  # stands for the model's turn while a template renders what follows it


class TurnRenderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.templated = chat_template is not None or bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return tokenize_prompt(self.tokenizer, prompt)
        if not self.templated:
            return tokenize_prompt(self.tokenizer, "".join(message["content"] for message in prompt))
        return tokenize_prompt(self.tokenizer, render_chat(prompt, self.tokenizer, self.chat_template,
                                                           "the env's prompt", add_generation_prompt=True))

    def observation_ids(self, observation: Observation, action_ended_in_eos: bool) -> list[int]:
        """The observation's tokens, to append after the model's turn (and before its next)."""
        if observation is None:
            return []
        if isinstance(observation, str):
            text = observation
        elif not self.templated:
            text = observation["content"]
        else:
            text = self._message_after_action(observation, action_ended_in_eos)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _message_after_action(self, message: dict[str, Any], action_ended_in_eos: bool) -> str:
        """What the template writes after an assistant turn's content: the turn's end (unless the model wrote it,
        as its EOS), the message, and the next assistant turn's generation prompt."""
        turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ACTION}]
        before = render_chat(turns, self.tokenizer, self.chat_template, "the env's observation")
        after = render_chat([*turns, message], self.tokenizer, self.chat_template, "the env's observation",
                            add_generation_prompt=True)
        end_of_action = before.rindex(_ACTION) + len(_ACTION)
        if after[:end_of_action] != before[:end_of_action]:
            raise ValueError("the chat template renders an assistant turn differently once a message follows it: "
                             "env observations cannot be appended to the model's tokens")
        text = after[end_of_action:]
        eos = self.tokenizer.eos_token
        if action_ended_in_eos and eos and text.startswith(eos):
            text = text[len(eos):]  # the model's own EOS closed its turn
        return text


def tokenize_turns(renderer: TurnRenderer, prompt: Prompt, turns: list[tuple[str, str]],
                   max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a multi-turn demonstration, laid out exactly as a rollout lays an episode out: the
    prompt, then each turn, the model's as its tokens (EOS after the last of them only) and the environment's as an
    observation; labels are IGNORE_INDEX everywhere but on the model's tokens. Cut to `max_length` tokens, the
    first kept (a rollout stops at rollout.max_model_len the same way)."""
    tokenizer = renderer.tokenizer
    ids = renderer.prompt_ids(prompt)
    labels = [IGNORE_INDEX] * len(ids)
    last_action = max(index for index, (role, _) in enumerate(turns) if role == "assistant")
    for index, (role, text) in enumerate(turns):
        if role == "assistant":
            tokens = tokenizer(text, add_special_tokens=False).input_ids
            tokens += [tokenizer.eos_token_id] if index == last_action else []
            ids, labels = ids + tokens, labels + tokens
        else:
            observation = renderer.observation_ids({"role": role, "content": text}, action_ended_in_eos=False)
            ids, labels = ids + observation, labels + [IGNORE_INDEX] * len(observation)
    return ids[:max_length], labels[:max_length]
