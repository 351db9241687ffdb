"""The least budget policy=auto accepts for a model, and a run at that budget against it.

Asks the search for an impossible budget, reads the smallest feasible one from its refusal, and
runs the model at that budget (search, load, generate) in a fresh process; then runs a tiny
model the same way in another. Prints both processes' peak RSS (`ru_maxrss`, what `/usr/bin/time
-v` reports) and the model's peak beyond the tiny run's, which is the interpreter's and the
libraries' own footprint: that difference is what the budget has to hold.

    python benchmarks/floor.py --model smollm2-135m --dtype float32 --prompt-tokens 512
    python benchmarks/floor.py --model dummy:llama-2-7b --prompts 2 --new-tokens 4
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options  # noqa: E402

CHILD = """
import json, resource, sys
from flexeval import Engine
from flexeval.planning.cost_model import Workload
from flexeval.planning.search import Budget, plan
spec, dtype, gpu, cpu, prompts, length, new, compression = sys.argv[1:]
workload = Workload(int(prompts), int(length), int(new))
from flexeval.engine.policy import Policy, compression_fields
base = Policy.from_dict(compression_fields(compression))
choice = plan(spec, workload, Budget.from_gb(float(gpu), float(cpu), None), base=base, dtype=dtype, device="cpu")
engine = Engine.load(spec, dtype=dtype, policy=choice.policy, device="cpu")
ids = [[1 + (i * 7 + t) % 200 for t in range(int(length))] for i in range(int(prompts))]
engine.generate(ids, max_new_tokens=int(new), stop_token_ids=[])
print(json.dumps({"policy": choice.summary(), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(spec: str, dtype: str, gpu: float, cpu: float, args, length: int) -> dict:
    argv = [spec, dtype, str(gpu), str(cpu), str(args.prompts), str(length), str(args.new_tokens)]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv, args.compression], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = options(__doc__, model="smollm2-135m", prompts=4, prompt_tokens=128, new_tokens=4, data=False)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compression", default="none")
    args = parser.parse_args()

    from flexeval import FlexevalError
    from flexeval.engine.policy import Policy, compression_fields
    from flexeval.planning.cost_model import Workload
    from flexeval.planning.search import GB, Budget, plan

    workload = Workload(args.prompts, args.prompt_tokens, args.new_tokens)
    base = Policy.from_dict(compression_fields(args.compression))
    try:
        plan(args.model, workload, Budget.from_gb(0.001, 0.001, None), base=base, dtype=args.dtype, device="cpu")
        raise SystemExit("a 1 MB budget was accepted: nothing to find")
    except FlexevalError as err:
        gpu, cpu = (
            float(v)
            for v in re.search(
                r"smallest feasible budget is gpu_mem_gb=([\d.e-]+), cpu_mem_gb=([\d.e-]+)", str(err)
            ).groups()
        )
    budget = (gpu + cpu) * GB
    ours = run(args.model, args.dtype, gpu, cpu, args, args.prompt_tokens)
    tiny = run("tiny-llama", "float32", gpu, cpu, args, 16)  # its context is 256 tokens
    over = ours["peak"] - tiny["peak"]
    print(
        f"{args.model} ({args.dtype}, compression={args.compression}), {args.prompts} prompts x "
        f"{args.prompt_tokens} tokens + {args.new_tokens} new"
    )
    print(f"least budget: gpu_mem_gb={gpu} cpu_mem_gb={cpu}, {budget / 2**30:.3f} GiB in all")
    print(f"chosen: {ours['policy']}")
    print(f"peak RSS {ours['peak'] / 2**30:.3f} GiB; a tiny model's run {tiny['peak'] / 2**30:.3f} GiB")
    print(f"beyond the tiny run: {over / 2**30:.3f} GiB = {over / budget:.2f} x the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
