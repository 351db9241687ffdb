"""What a user asks of the placement, from either front door, parsed and checked once.

The Hydra app (its `policy`, `compression`, `hardware` and `workload` sections) and the lm-eval
backend (`model_args`) both name a preset or `auto`, `Policy` fields over it, memory budgets and,
for `auto`, workload values. `PolicyRequest.parse` takes them in the engine's terms and refuses
what is wrong before any model loads; then `fixed` gives a preset's policy, its weights checked
against the budgets, and `plan` (`auto`) the search's plan within them for the workload the tasks
will run, counted from their requests, with any given workload values over it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from flexeval.engine.placement import weight_bytes_per_tier
from flexeval.engine.policy import Policy
from flexeval.errors import FlexevalError
from flexeval.models import registry
from flexeval.planning.cost_model import Workload
from flexeval.planning.search import BUDGET_KEYS, GB, Budget, Choice, plan

AUTO = "auto"
WORKLOAD_LEAST = {"sequences": 1, "prompt_len": 1, "gen_len": 0}  # the given values policy=auto plans with
Named = Callable[[str], str]  # an option's name as its front door spells it (hardware.gpu_mem_gb, or gpu_mem_gb)


@dataclass(frozen=True)
class PolicyRequest:
    """A preset (None: `values` are the whole policy, as the app composes it) or `auto`, `Policy`
    fields over it, the budgets, and the workload values given (auto; the rest are counted from
    the tasks). `name` is what errors call the policy; `named` spells an option's name."""

    preset: str | None
    values: Mapping[str, Any]
    budget: Budget = Budget()
    workload: Mapping[str, int] = field(default_factory=dict)
    name: str | None = None
    named: Named = str

    @classmethod
    def parse(
        cls,
        preset: str | None,
        values: Mapping[str, Any],
        budgets: Mapping[str, Any],
        workload: Mapping[str, Any],
        name: str | None = None,
        named: Named = str,
    ) -> PolicyRequest:
        """Checked: every field a `Policy` field with a valid value, budgets finite numbers of GB
        above 0 (the disk's may be 0), workload values whole numbers within range. Values may be
        strings (a command line's)."""
        unknown = sorted(set(values) - {f.name for f in fields(Policy)})
        if unknown:
            raise FlexevalError(f"unknown policy fields {unknown}; valid: {', '.join(f.name for f in fields(Policy))}")
        request = cls(preset, dict(values), _budget(budgets, named), _workload(workload, named), name or preset, named)
        request.base()  # every value checked now, before any model loads
        return request

    @property
    def auto(self) -> bool:
        return self.preset == AUTO

    def base(self) -> Policy:
        """The preset with the fields over it; for `auto`, what the search does not choose."""
        if self.preset is None or self.auto:  # the fields over the defaults
            return Policy.from_dict(self.values)
        return Policy.from_dict(self.values, preset=self.preset)

    def fixed(self, spec: str | Path, dtype: torch.dtype) -> Policy:
        """A preset's policy, whose weights must fit the budgets of the tiers it puts them on."""
        policy = self.base()
        given = self.budget.given()
        if not given:
            return policy
        layers = registry.build_model(registry.resolve(spec)).layers  # config.json only; no weights are read
        placed = dict(zip(("compute", "cpu", "disk"), weight_bytes_per_tier(layers, policy, dtype)))
        total = sum(placed.values())
        for tier, budget in given.items():
            if placed[tier] > budget:
                fits = int(100 * budget / total)
                fix = {
                    "compute": f"w_gpu_percent at most {fits}",
                    "cpu": f"w_cpu_percent at most {fits}",
                    "disk": f"w_gpu_percent + w_cpu_percent at least {100 - fits}",
                }[tier]
                key = self.named(BUDGET_KEYS[tier])
                raise FlexevalError(
                    f"policy {self.name} puts {placed[tier] / GB:.3g} GB of weights on the {tier} tier "
                    f"but {key}={budget / GB:g}: choose a policy with {fix}"
                )
        return policy

    def planned_for(self, counted: Workload | None) -> Workload:
        """The workload auto plans for: the given values over those counted from the tasks."""
        if counted is None:
            missing = sorted(set(WORKLOAD_LEAST) - set(self.workload))
            if missing:
                raise FlexevalError(
                    f"policy=auto: no requests to count, and {', '.join(map(self.named, missing))} not given"
                )
            return Workload(**self.workload)
        given = dict(self.workload)
        if given.keys() & {"sequences", "prompt_len"}:  # the counted lengths no longer describe them
            given["lengths"] = ()
        return replace(counted, **given)

    def plan(
        self,
        spec: str | Path,
        workload: Workload,
        *,
        dtype: str | torch.dtype,
        device: str | torch.device | None,
        offload_dir: str | Path | None,
        profile_overrides: Mapping[str, Any] | None = None,
    ) -> Choice:
        """`auto`'s plan: the search's policy within the budgets for `workload` (`planned_for`'s)."""
        return plan(
            spec,
            workload,
            self.budget,
            base=self.base(),
            dtype=dtype,
            device=device,
            offload_dir=offload_dir,
            profile_overrides=profile_overrides,
        )

    @property
    def workload_given(self) -> bool:
        """Whether every workload value is given, so that nothing needs counting."""
        return set(WORKLOAD_LEAST) <= set(self.workload)


def _budget(budgets: Mapping[str, Any], named: Named) -> Budget:
    """The budgets as numbers of GB (a command line's are text), their range checked by `Budget.from_gb`."""
    gigabytes = []
    for key in BUDGET_KEYS.values():
        value = budgets.get(key)
        try:
            if isinstance(value, bool):  # lm-eval reads "true" as True, which float() takes for 1
                raise ValueError
            gigabytes.append(None if value is None else float(value))
        except (TypeError, ValueError):
            raise FlexevalError(f"{named(key)} must be a number of GB, got {value!r}") from None
    return Budget.from_gb(*gigabytes, named=named)


def checked_max_length(given: Any, window: int, named: Named = str) -> int:
    """The most tokens a sequence may hold: `given` (max_length) if any, else the model's context
    `window` (from its config: no weights are read); more than the window is refused, as the
    model has no positions beyond it."""
    if given is None:
        return window
    length = _whole("max_length", given, 1, named)
    if length > window:
        raise FlexevalError(
            f"{named('max_length')}={length} exceeds the model's context window of {window} tokens: "
            f"give at most {window}, or leave it unset"
        )
    return length


def _workload(values: Mapping[str, Any], named: Named) -> dict[str, int]:
    unknown = sorted(set(values) - set(WORKLOAD_LEAST))
    if unknown:
        raise FlexevalError(f"unknown workload values {unknown}; valid: {', '.join(WORKLOAD_LEAST)}")
    return {
        name: _whole(name, value, WORKLOAD_LEAST[name], named) for name, value in values.items() if value is not None
    }


def _whole(name: str, value: Any, least: int, named: Named) -> int:
    """A whole number of at least `least`, from a number or a command line's text."""
    try:
        number = int(str(value))
    except ValueError:
        raise FlexevalError(f"{named(name)} must be a whole number, got {value!r}") from None
    if number < least:
        raise FlexevalError(f"{named(name)} must be at least {least}, got {number}")
    return number
