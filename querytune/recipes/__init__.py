"""Per-task recipes: the official per-task settings of methods on a benchmark, shipped as data
(``<name>.json`` beside this module; ``vtab1k``: VQT's and SynQT's settings for the 19 VTAB-1k
tasks). Each method's settings name their source in the official code. A recipe that ``follows``
another maps its own task names onto that recipe's tasks (``vtab1k-mini``: the vtab1k-mini tasks
read as the VTAB-1k tasks they stand in for)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RECIPES = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.json"))


def load_recipe(name: str) -> dict[str, Any]:
    path = RECIPES / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(recipe_names())})")
    return json.loads(path.read_text())


def recipe_options(name: str, method: str, task: str) -> dict[str, Any]:
    """The options recipe ``name`` sets for ``method`` on ``task``: none where the recipe has no
    settings for the method; a task it does not know is an error that lists the known ones."""
    recipe = load_recipe(name)
    if "follows" in recipe:
        if task not in recipe["tasks"]:
            raise ConfigError(f"task {task!r} is not in recipe {name!r} (known: {', '.join(sorted(recipe['tasks']))}); "
                              "name the task with --task-name")
        return recipe_options(recipe["follows"], method, recipe["tasks"][task])
    settings = recipe["methods"].get(method)
    if settings is None:
        return {}
    if task not in settings["tasks"]:
        raise ConfigError(f"task {task!r} is not in recipe {name!r} for {method} (known: "
                          f"{', '.join(sorted(settings['tasks']))}); name the task with --task-name")
    return dict(settings["tasks"][task])
