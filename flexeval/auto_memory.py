"""One `policy=auto` run in a fresh process, printing its measured RAM peak as JSON (for
`tests/test_search.py::test_auto_policies_run_within_their_budget` and
`benchmarks/auto_memory.py`, on `flexeval.models.tiny.WIDE_LLAMA`'s model).

    python -m flexeval.auto_memory CHECKPOINT_DIR BUDGET_BYTES OFFLOAD_DIR

The budget is split evenly between the compute and CPU tiers (both RAM here). The peak is the
process's resident high-water mark during generation (reset once the model is loaded, through
/proc/self/clear_refs) less its resident size before the model loaded, after a warm-up that
gives the math libraries their buffers: the engine's RAM, weights held included.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from flexeval import Engine, FlexevalError
from flexeval.engine.heap import release_free_memory
from flexeval.planning.cost_model import Workload
from flexeval.planning.search import Budget, plan

WORKLOAD = Workload(sequences=16, prompt_len=64, gen_len=8, uniform=True)


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    directory, budget_bytes, offload = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    budget = Budget(compute=budget_bytes / 2, cpu=budget_bytes / 2)
    try:
        choice = plan(directory, WORKLOAD, budget, dtype="float32", device="cpu", offload_dir=offload)
    except FlexevalError as err:
        print(json.dumps({"error": str(err)}))
        return 0
    warm = Engine.load(directory, dtype="float32", device="cpu", policy=choice.policy, offload_dir=offload)
    prompts = [list(range(1 + i, 1 + i + WORKLOAD.prompt_len)) for i in range(WORKLOAD.sequences)]
    warm.generate(
        prompts, max_new_tokens=WORKLOAD.gen_len, stop_token_ids=[]
    )  # the same shapes: the math libraries size their buffers now
    warm.close()
    del warm
    gc.collect()
    release_free_memory()
    baseline = status("VmRSS")
    engine = Engine.load(directory, dtype="float32", device="cpu", policy=choice.policy, offload_dir=offload)
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current size
    engine.generate(prompts, max_new_tokens=WORKLOAD.gen_len, stop_token_ids=[])
    peak = status("VmHWM") - baseline
    print(json.dumps({"peak": peak, "predicted": choice.prediction.peak_bytes, "policy": choice.summary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
