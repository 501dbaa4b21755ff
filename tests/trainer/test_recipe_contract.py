"""The recipe contract (finetune_trainer.recipes.Recipe): every objective's module implements it and
imports no other recipe; what they share lives in config.py and recipes/base.py (fast, no model)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from finetune_trainer.recipes import Recipe
from finetune_trainer.runner import RECIPES

OBJECTIVES = ("sft", "dpo", "reward", "ppo")


def test_every_objective_has_a_recipe() -> None:
    from finetune_api.spec import ObjectiveType

    assert set(RECIPES) == set(ObjectiveType.__args__) == set(OBJECTIVES)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_recipe_implements_the_contract(objective: str) -> None:
    module = RECIPES[objective]
    assert isinstance(module, Recipe)
    assert module.__name__ == f"finetune_trainer.recipes.{objective}"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_recipe_imports_no_other_recipe(objective: str) -> None:
    tree = ast.parse(Path(RECIPES[objective].__file__ or "").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:  # from . import x / from .x import y: inside recipes/
                imported |= {module} if module else {a.name for a in node.names}
            elif module.startswith("finetune_trainer.recipes."):
                imported.add(module.rsplit(".", 1)[-1])
    assert not imported & (set(OBJECTIVES) - {objective})
