"""Cross-field rules, written once and enforced twice.

Each rule carries a CEL expression (rendered into the CRD as `x-kubernetes-validations`, so that
`kubectl apply` rejects the object) and a Python predicate (run by the pydantic model, so that
`finetune validate`, the operator and the trainer reject it too). Both use the same message.
A test applies every bad manifest to a real API server to keep the two halves in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    check: Callable[[Any], bool]

    def x_validation(self) -> dict[str, str]:
        # The message names the fields itself; the error is reported at the object's path on
        # both sides, so the two messages are identical.
        return {"rule": self.cel, "message": self.message}


@dataclass(frozen=True)
class TransitionRule:
    """A rule about an update (CEL with `oldSelf`), checked by the API server only: `finetune
    validate` sees one object, not the change from the stored one."""

    cel: str
    message: str

    def x_validation(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


RULE_ERROR_TYPE = "rule"


def enforce(rules: tuple[Rule, ...], obj: Any) -> None:
    """Raise on the first broken rule (pydantic reports it at the object's path)."""
    for rule in rules:
        if not rule.check(obj):
            raise PydanticCustomError(RULE_ERROR_TYPE, rule.message)


def x_validations(rules: Iterable[Rule | TransitionRule]) -> list[dict[str, str]]:
    return [r.x_validation() for r in rules]


def unchanged_optional(field: str) -> str:
    """CEL: an optional field keeps its value, set or not (`self == oldSelf` on the field itself
    would not see it being added or removed)."""
    return f"(has(self.{field}) ? self.{field} : '') == (has(oldSelf.{field}) ? oldSelf.{field} : '')"
