"""The import layering the code relies on: the core library `relay/` knows no Ray role or job (only the CLI
dispatches to them), the roles (`actors/`) know no job, and the jobs import shared code from jobs/common.py; only the
driver imports its rooms and the training jobs it runs, and only the commands built on the driver import it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # `from .x import y`, `from . import x`: named from the file's package
            prefix = [*path.relative_to(ROOT).with_suffix("").parts[:-node.level], *filter(None, [node.module])]
            modules |= ({".".join(prefix)} if node.module
                        else {".".join([*prefix, alias.name]) for alias in node.names})
    return modules


def test_relative_imports_are_followed():
    module = ROOT / "actors" / "a_module_for_this_test.py"
    try:
        module.write_text("from ..jobs import common\nfrom .group import ActorGroup\nfrom . import learner\n")
        assert imported_modules(module) == {"jobs", "actors.group", "actors.learner"}
    finally:
        module.unlink()


def test_core_imports_no_actor_and_no_job():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in ("actors", "jobs"))
        for path in (ROOT / "relay").rglob("*.py")
        if path.name != "cli.py"
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_jobs_import_only_common_and_the_jobs_they_build_on():
    # The driver's rooms (the rollout source, the roles, the iteration, the record, supervision) are the
    # driver's; the evaluation and the bench reuse the driver and the rooms they need.
    rooms = {"jobs.rollout_source", "jobs.episode_source", "jobs.roles", "jobs.iteration", "jobs.record",
             "jobs.supervision"}
    allowed = {"jobs.ppo": {"jobs.common", "jobs.sft", "jobs.reward_model", *rooms},
               "jobs.iteration": {"jobs.record", "jobs.roles", "jobs.rollout_source"},
               "jobs.record": {"jobs.common"},
               "jobs.rollout_source": {"jobs.episode_source"},
               "jobs.bench": {"jobs.common", "jobs.ppo", "jobs.rollout_source", "jobs.trl_baseline"},
               "jobs.agent_bench": {"jobs.common", "jobs.episode_source"},
               "jobs.evaluate": {"jobs.common", "jobs.ppo", "jobs.record", "jobs.roles"}}
    for path in (ROOT / "jobs").glob("*.py"):
        name = f"jobs.{path.stem}"
        uses = {m for m in imported_modules(path) if m.startswith("jobs.")}
        assert uses <= allowed.get(name, {"jobs.common"}), f"{name} imports {sorted(uses)}"
    assert not {m for m in imported_modules(ROOT / "jobs" / "common.py") if m.startswith("jobs")}


def test_the_roles_import_no_job():
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "jobs")
                 for path in (ROOT / "actors").glob("*.py")}
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_every_import_of_the_jobs_is_at_the_top_of_the_file():
    for path in [*(ROOT / "jobs").glob("*.py"), *(ROOT / "actors").glob("*.py")]:
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        nested = [node.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level
                  and any((getattr(node, "module", None) or "").startswith(prefix) or any(a.name.startswith(prefix) for a in node.names)
                          for prefix in ("jobs", "actors", "relay"))]
        assert nested == [], f"{path.relative_to(ROOT)}: function-local imports of relay code at lines {nested}"
