"""`Policy` (`flexeval.engine.policy`): infeasible and unknown fields refused, naming the valid ones."""

from __future__ import annotations

import pytest

from flexeval import FlexevalError, Policy
from flexeval.quantization.config import CompressionConfig


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(w_gpu_percent=80, w_cpu_percent=30), "w_gpu_percent + w_cpu_percent = 110 exceeds 100"),
        (dict(cache_cpu_percent=-5), "cache_cpu_percent must be between 0 and 100"),
        (dict(act_gpu_percent=101), "act_gpu_percent must be between 0 and 100"),
        (dict(gpu_batch_size=0), "gpu_batch_size must be a positive integer"),
        (dict(num_gpu_batches=2.5), "num_gpu_batches must be a positive integer"),
        (dict(attn_sparsity=0.0), r"attn_sparsity must be in \(0, 1\]"),
        (dict(attn_sparsity=1.5), r"attn_sparsity must be in \(0, 1\]"),
        (dict(comp_weight_config="4:64:0"), "comp_weight_config must be a CompressionConfig"),
        (dict(comp_cache_config=CompressionConfig(4, 64, 2)), "comp_cache_config.group_dim must be the head"),
    ],
)
def test_infeasible_policies_are_refused(fields: dict, expected: str) -> None:
    with pytest.raises(FlexevalError, match=expected.replace("+", r"\+")):
        Policy(**fields)


def test_unknown_policy_fields_list_the_valid_ones() -> None:
    with pytest.raises(FlexevalError, match="unknown fields \\['w_gpu'\\]; valid fields: act_cpu_percent"):
        Policy.from_dict({"w_gpu": 10})
