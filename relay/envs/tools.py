"""ToolEnv, the built-in tool-calling environment, and its built-in tool, a safe arithmetic calculator.

The model answers a row's question and may call tools on the way: Python callables named in config
(`module:function`, sync or async, each call bounded by `tool_timeout_s`). A call is written as Qwen2.5's and
Hermes' chat templates render one, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and its result comes
back as a `tool` message (the chat template's `<tool_response>`; its content alone without a template). Malformed
JSON, an unknown tool or a tool that fails comes back as an error text the model can learn from, and is counted.
A turn without a call is the final answer, scored 1 if it equals the row's answer column (whitespace aside).

`call_format: compact` is for a tiny model's short context and small alphabet: a call is `[expression]` to the
first tool, its result comes back as `result;`, an error as `?;`.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import operator
import re
from typing import Any, Callable, Literal

from relay.tasks import load_object

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
MAX_EXPONENT = 64  # 10**64 is as large as an answer needs to be; 9**9**9 would hang the env


def calculator(expression: str) -> str:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses: parsed with `ast` and
    walked, never `eval`. Integral results print without a decimal point."""
    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"not an expression: {expression!r}") from None
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


_JSON_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_COMPACT_CALL = re.compile(r"\[([^\[\]]*)\]")


class ToolEnv:
    stop = ["</tool_call>"]

    def __init__(self, tools: list[str] | None = None, call_format: Literal["json", "compact"] = "json",
                 answer_key: str = "answer", prompt_key: str = "prompt", tool_timeout_s: float = 10.0,
                 system: str | None = None, score_answer: bool = True) -> None:
        """`system`: a system message before the row's prompt (say which tools there are and how to call them);
        `score_answer: false` leaves the final answer to the run's reward source (`reward`), e.g. rules on the row's
        answer column."""
        if call_format not in ("json", "compact"):
            raise ValueError(f"call_format {call_format!r}: json or compact")
        self.system, self.score_answer = system, score_answer
        self.tools = {spec.rpartition(":")[2]: load_object(spec, "a tool")
                      for spec in tools or [f"{__name__}:calculator"]}
        self.call_format, self.answer_key, self.prompt_key = call_format, answer_key, prompt_key
        self.tool_timeout_s = tool_timeout_s
        if call_format == "compact":
            self.stop = ["]"]

    def reset(self, row: dict[str, Any], seed: int) -> tuple[str | list[dict[str, str]], dict[str, Any]]:
        self.answer = str(row.get(self.answer_key, "")).strip()
        if self.system is None:
            return row[self.prompt_key], {}
        return [{"role": "system", "content": self.system}, {"role": "user", "content": row[self.prompt_key]}], {}

    async def step(self, action: str) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        call = (_COMPACT_CALL if self.call_format == "compact" else _JSON_CALL).search(action)
        if call is None:  # the final answer
            return None, float(self.score_answer and action.strip() == self.answer), True, False, {}
        try:
            result, errors = await self._run(call.group(1)), 0
        except Exception as error:  # noqa: BLE001 - the model's call, or the tool, was wrong: it reads why
            result, errors = f"error: {error}", 1
        if self.call_format == "compact":
            observation: Any = f"{result};" if not errors else "?;"
        else:
            observation = {"role": "tool", "content": result}
        return observation, 0.0, False, False, {"tool_calls": 1, "tool_errors": errors}

    async def _run(self, call: str) -> str:
        if self.call_format == "compact":
            name, arguments = next(iter(self.tools)), {"expression": call}
        else:
            try:
                request = json.loads(call)
                name, arguments = request["name"], request.get("arguments", {})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"a tool call is JSON with a name and arguments, not {call.strip()[:80]!r}") from None
        if name not in self.tools:
            raise ValueError(f"no tool {name!r}; the tools: {', '.join(self.tools)}")
        tool = self.tools[name]
        running = tool(**arguments) if inspect.iscoroutinefunction(tool) else asyncio.to_thread(tool, **arguments)
        return str(await asyncio.wait_for(running, self.tool_timeout_s))
