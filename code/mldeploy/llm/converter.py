"""llama.cpp's Hugging Face → GGUF converter, taken from llama-cpp-python's source distribution.

The llama-cpp-python wheel carries the C++ library but not ``convert_hf_to_gguf.py``; its source
distribution has the converter, the ``conversion`` package it imports and the ``gguf-py`` it was
written against. ``python -m mldeploy.llm.converter`` (run by ``make venv``, online) downloads that
distribution once and extracts the three into ``<venv>/share/llama.cpp/``; at run time (offline) the
converter is run from there as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

HOME = Path(sys.prefix) / "share" / "llama.cpp"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def version() -> str:
    """The installed llama-cpp-python version: the converter must come from the same release."""
    return metadata.version("llama-cpp-python")


def script() -> Path:
    """Path of ``convert_hf_to_gguf.py``; a clear error when ``make venv`` has not extracted it."""
    path = HOME / version() / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is missing ({path}): run `make venv` "
            "(or `python -m mldeploy.llm.converter`) once while online"
        )
    return path


def env() -> dict[str, str]:
    """Environment for the converter: offline, and the bundled gguf-py rather than PyPI's."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def convert(model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run the converter on a ``save_pretrained`` folder; returns ``out``."""
    cmd = [sys.executable, str(script()), str(model_dir), "--outfile", str(out)]
    done = subprocess.run(
        [*cmd, "--outtype", outtype], env=env(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-2000:]}")
    return out


def install() -> Path:
    """Download llama-cpp-python's source distribution and extract the converter (idempotent)."""
    target = HOME / version()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"llama-cpp-python=={version()}", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        HOME.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=HOME))
        with tarfile.open(sdist) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and name.startswith(MEMBERS) and member.isfile():
                    member.name = name
                    tar.extract(member, staging, filter="data")
    staging.replace(target)  # all or nothing: a half-extracted converter is never used
    return target


if __name__ == "__main__":
    print(f"llama.cpp converter in {install()}")
