"""From YAML and `dotted.key=value` overrides to a validated RelayConfig, and back to YAML; every error is a
ConfigError naming the file and the field's dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relay.config.tree import RelayConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries in a nested dict; values are parsed as YAML (so `0.1`, `true`, `null` work)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parents[: depth + 1])} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return tree


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RelayConfig:
    """Read a YAML file (or start from defaults) and apply overrides; raise ConfigError naming the bad field."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {where}{problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    try:
        return RelayConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def dump_config(config: RelayConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_from_command_line(description: str, argv: list[str] | None = None) -> RelayConfig:
    """`--config FILE [dotted.key=value ...]` as every job entrypoint takes it; a bad config exits with its message."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. algorithm.kl_coef=0.1")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(str(error))
