"""Planning: which policy to run, before the model loads. `hardware` measures what this machine
computes and moves per second, `timing` how long each kind of layer takes, `cost_model` turns a
policy and a workload into seconds and bytes per tier, `search` solves the linear program for
the fastest policy within the memory budgets, and `request` parses what a front door asks for.
It reads the runtime's pure functions (placement, pool and schedule rules); the runtime never
imports it."""

from flexeval.lazy import exports

__all__, __getattr__ = exports(
    __name__,
    {
        ".hardware": ("HardwareProfile",),
        ".cost_model": ("CostModel", "Workload"),
        ".search": ("Budget", "Choice", "plan"),
        ".request": ("PolicyRequest",),
    },
)
