"""Resuming a run that was killed: nothing computed is computed again.

A run directory keeps what a rerun needs: `run.json` (the configuration, so that a rerun with
other options cannot mix its answers in), each finished task's results (`flexeval.evaluate`),
and `requests.jsonl`, every request's answer appended as the backend produces it. A rerun into
the directory (`resume=<run dir>`) keeps the finished tasks and, for the others, asks the
backend only for the requests the log does not answer, as lm-eval's `--use_cache` does, but in
JSON lines rather than pickles: reading a log runs no code. The engine's results do not depend
on which other requests share a batch (`flexeval.reproducible`), so answers read back equal the
ones an uninterrupted run computes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, hash_args
from omegaconf import OmegaConf

from flexeval.atomic import write_text
from flexeval.errors import FlexevalError

log = logging.getLogger(__name__)
RUN = "run.json"
REQUESTS = "requests.jsonl"
METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
NOT_COMPARED = ("resume",)  # options that may differ between a run and its resumption


def recorded_config(config: Any) -> dict[str, Any]:
    """The options a run's answers depend on, as run.json records them."""
    container = OmegaConf.to_container(config, resolve=True)
    return {key: value for key, value in container.items() if key not in NOT_COMPARED}


def check_resumable(directory: Path, config: Any) -> None:
    """Refuse to resume a directory that holds no run, or a run of other options."""
    record = directory / RUN
    if not record.is_file():
        raise FlexevalError(
            f"resume={directory}: not a flexeval run directory (no {RUN}): give a run's output directory"
        )
    ran = json.loads(record.read_text(encoding="utf-8"))
    differs = sorted(_differences(ran, recorded_config(config)))
    if differs:
        raise FlexevalError(
            f"resume={directory} ran with other options ({', '.join(differs)}): resume with the options it ran with, "
            "or start a new run"
        )


def start(directory: Path, config: Any) -> None:
    """Record the run's options (a directory that already has them is being resumed)."""
    if (directory / RUN).is_file():
        check_resumable(directory, config)
        return
    write_text(directory / RUN, json.dumps(recorded_config(config), indent=2) + "\n")


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in a.keys() | b.keys() for d in _differences(a.get(key), b.get(key), f"{path}{key}.")]
    return [] if a == b else [f"{path.rstrip('.')}={b!r} (ran with {a!r})"]


class RequestLog:
    """Answers by request, appended one JSON line each; a line torn by a kill is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, Any] = {}
        if path.is_file():
            self._read()
        self._file: TextIO | None = path.open("a", encoding="utf-8")

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        kept = 0  # bytes of whole lines: a kill mid-write leaves a last line without its newline
        for number, line in enumerate(lines[:-1], 1):
            try:
                entry = json.loads(line)
                self.answers[entry["key"]] = entry["answer"]
            except (ValueError, KeyError, TypeError):
                raise FlexevalError(
                    f"{self.path} line {number} is not a request's answer: the log is damaged; "
                    "delete the file to compute every request again"
                ) from None
            kept += len(line) + 1
        if lines[-1]:
            log.warning("%s: dropped a last line cut short by a kill", self.path)
            with self.path.open("r+b") as f:
                f.truncate(kept)

    def add(self, key: str, answer: Any) -> None:
        """Append one answer, flushed: a killed run keeps every answer it produced."""
        self.answers[key] = answer
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({"key": key, "answer": answer}) + "\n")
            self._file.flush()
        except OSError as err:  # the results matter more than the log: keep computing
            log.warning("%s: %s; this run can no longer be resumed", self.path, err.strerror or err)
            self._close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


class ResumableLM(LM):
    """An lm-eval model that answers from a `RequestLog` first and logs what the model answers.

    lm-eval's `CachingLM` for its own command line, without pickle; sampled generations are
    computed again, as there (a seed and a batch make them, not the request alone).
    """

    def __init__(self, lm: LM, requests: RequestLog) -> None:
        super().__init__()
        self.lm = lm
        self.requests = requests
        self.read_back = 0  # requests answered from the log since this was made
        lm.set_cache_hook(_Hook(requests))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)

    # what lm-eval asks of a model besides requests, which LM itself answers otherwise
    rank = property(lambda self: self.lm.rank)
    world_size = property(lambda self: self.lm.world_size)
    tokenizer_name = property(lambda self: self.lm.tokenizer_name)
    device = property(lambda self: self.lm.device)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.chat_template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.apply_chat_template(chat_history, add_generation_prompt)

    def all_gather(self, tensor: Any) -> Any:
        return self.lm.all_gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> Any:
        return self.lm.gather_object(obj, dst)

    def barrier(self) -> None:
        self.lm.barrier()

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._answer("loglikelihood", requests, disable_tqdm, lambda a: (float(a[0]), bool(a[1])))

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._answer("loglikelihood_rolling", requests, disable_tqdm, float)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._answer("generate_until", requests, disable_tqdm, str)

    def _answer(self, method: str, requests: list[Instance], disable_tqdm: bool, read: Callable[[Any], Any]) -> list:
        answers: list[Any] = [None] * len(requests)
        missing = []
        for i, request in enumerate(requests):
            key = hash_args(method, request.args)
            if key in self.requests.answers and not _sampled(method, request):
                answers[i] = read(self.requests.answers[key])
            else:
                missing.append(i)
        read_back = len(requests) - len(missing)
        self.read_back += read_back
        if read_back:
            log.info(
                "resume: %d of %d %s requests read back, %d to compute", read_back, len(requests), method, len(missing)
            )
        if missing:
            computed = getattr(self.lm, method)([requests[i] for i in missing], disable_tqdm=disable_tqdm)
            for i, answer in zip(missing, computed, strict=True):
                answers[i] = answer
        return answers


def _sampled(method: str, request: Instance) -> bool:
    if method != "generate_until":
        return False
    kwargs = request.args[1]
    return bool(kwargs.get("do_sample")) or float(kwargs.get("temperature") or 0) > 0


class _Hook:
    """What the backend calls as each request is answered (lm-eval's `CacheHook` interface)."""

    def __init__(self, requests: RequestLog) -> None:
        self.requests = requests

    def add_partial(self, method: str, args: Any, answer: Any) -> None:
        self.requests.add(hash_args(method, args), answer)
