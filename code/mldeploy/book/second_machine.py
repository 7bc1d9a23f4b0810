"""A second machine on one machine: do the stored outputs hold where the CPU differs?

Three checks (``make second-machine`` runs all three):

``notebooks``
    nbval over every notebook in a process that looks like another runner to everything that can
    be steered from outside: one visible core (``taskset``: other default thread counts in PyTorch
    and ONNX Runtime), MKL, oneDNN and NumPy on their AVX2 code as on a CPU without AVX-512, and a
    caller's shell that asks for PyTorch's scalar kernels (``ATEN_CPU_CAPABILITY=default``) and
    two OpenMP threads. The pin (``mldeploy.reproducibility``) must win; the largest drift per
    notebook is written to ``_build/second-machine/drift.json``.
``kernels``
    MKL picks its kernels by vendor as well as by instruction set. This check computes
    ``reproducibility.kernel_fingerprint()``, a few training steps of each of the chapter's
    models and 5.3's GPTQ, AWQ and QAT on one of them (``TRAINING_PROBE``) under the pin,
    natively and inside ``qemu-x86_64`` as an Intel Haswell and as an AMD EPYC (Rome), and fails
    unless all three agree bit for bit. It also prints whether MKL's ``sqrt``, which the library
    avoids, agrees (it does not).
``ort``
    ONNX Runtime picks its kernels from the CPU itself (AVX-512, AVX2, VNNI), with no switch. This
    check evaluates the chapter's ONNX models natively and inside ``qemu-x86_64 -cpu Haswell``
    (an Intel CPU with AVX2 and FMA, without AVX-512 or VNNI), and compares the numbers the
    notebooks print with the tolerance they declare. Needs Debian's ``qemu-user``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mldeploy import reproducibility, timeouts
from mldeploy.paths import REPO_ROOT

OUT = REPO_ROOT / "_build" / "second-machine"
QEMU_CPU = "Haswell-v4"
QEMU_VENDORS = ("Haswell-v4", "EPYC-Rome")  # an Intel and an AMD CPU with AVX2, no AVX-512
KERNEL_PROBE = (
    "import json; from mldeploy import reproducibility as r; r.pin_compute_path(); "
    "print(json.dumps(r.kernel_fingerprint()))"
)
# A few pinned training steps of each model whose results the notebooks store, and 5.3's GPTQ,
# AWQ and QAT applied to one of them: a weight digest each.
TRAINING_PROBE = """
import hashlib, json, torch
from mldeploy import reproducibility
reproducibility.pin_compute_path()
from mldeploy import training
from mldeploy.llm import model as llama, training as llama_training
from mldeploy.quant import charlm, qat
from mldeploy.quant.fake_quant import QuantSpec
from mldeploy.quant.weight_only import quantize_model

def digest(module):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in module.parameters()))

out = {"capability": torch.backends.cpu.get_cpu_capability()}
torch.set_num_threads(1)
training.set_seed(0)
lm = charlm.CharMLP(hidden=128)
corpus = charlm.load_corpus()
charlm.fit(lm, corpus.train, steps=40, batch_size=64)
out["charlm"] = digest(lm).hexdigest()[:16]
spec = QuantSpec(bits=2, group_size=128)
calibration, _ = charlm.sample_windows(corpus.train, lm.context, 256, seed=0)
for method in ("gptq", "awq"):
    out[method] = digest(quantize_model(lm, spec, method, calibration)[0]).hexdigest()[:16]
out["qat"] = digest(qat.qat_finetune(lm, corpus.train, spec, steps=10)[0]).hexdigest()[:16]
out["two_moons"] = digest(training.train_two_moons(epochs=3).model).hexdigest()[:16]
cfg = llama_training.TrainConfig(steps=3, batch_size=2, seq_len=32)
training.set_seed(0)
net = llama.Llama(cfg.model)
ids = torch.randint(0, cfg.model.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
llama_training.fit(net, ids, cfg)
out["llama"] = digest(net).hexdigest()[:16]
print(json.dumps(out))
"""
# MKL's vector sqrt (torch.sqrt on CPU), which the library avoids: printed, not required to agree.
MKL_SQRT_PROBE = (
    "import hashlib, json, torch; from mldeploy import reproducibility as r; "
    "r.pin_compute_path(); torch.set_num_threads(1); "
    "x = torch.rand(100000, generator=torch.Generator().manual_seed(0)) * 100; "
    "print(json.dumps({'mkl_sqrt': hashlib.sha256(x.sqrt().numpy().tobytes()).hexdigest()[:12]}))"
)
MACHINE_B_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "OMP_NUM_THREADS": "2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # NumPy's float64 exp and log take other code on AVX-512: run its AVX2 (x86-64-v3) code
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
# What the ORT worker computes; it imports only numpy and onnxruntime, so it runs under QEMU.
WORKER = """
import json, sys
import numpy as np
import onnxruntime as ort

spec = json.loads(sys.argv[1])
out = {}
for name, job in spec.items():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
    x = np.load(job["x"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    if job["kind"] == "perplexity":
        y = np.load(job["y"])
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        out[name] = float(np.exp(-logp[np.arange(len(y)), y].mean()))
        ref = np.load(job["reference"]).astype(np.float64)
        ref -= ref.max(axis=1, keepdims=True)
        ref_logp = ref - np.log(np.exp(ref).sum(axis=1, keepdims=True))
        kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=1).mean()
        out[name.replace("perplexity", "KL vs FP32")] = float(kl)
        out[name.replace("perplexity", "top-1 agreement")] = float(
            (logits.argmax(1) == ref.argmax(1)).mean()
        )
    elif job["kind"] == "accuracy":
        out[name] = float((logits.argmax(1) == np.load(job["y"])).mean())
    else:
        out[name] = float(np.abs(logits - np.load(job["reference"])).max())
print(json.dumps(out))
"""


def run_notebooks(notebooks: list[Path]) -> int:
    """nbval over ``notebooks`` as machine B; returns pytest's exit code."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MACHINE_B_ENV, "MLDEPLOY_DRIFT_REPORT": str(OUT / "drift.json")}
    command = [sys.executable, "-m", "pytest", "--nbval", "-p", "no:cacheprovider", "-q"]
    command += ["--nbval-sanitize-with", str(REPO_ROOT / "tests" / "sanitize.cfg")]
    command += [str(p) for p in notebooks]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str((os.cpu_count() or 1) - 1), *command]
    print("machine B:", " ".join(f"{k}={v}" for k, v in MACHINE_B_ENV.items()), "+ one core")
    code = subprocess.run(command, env=env, cwd=REPO_ROOT).returncode
    report = json.loads((OUT / "drift.json").read_text()) if (OUT / "drift.json").is_file() else {}
    for name, drift in sorted(report.get("largest_relative_drift", {}).items()):
        cells = report.get("cells_within_tolerance", {}).get(name, [])
        print(f"  {name:<40} largest relative drift {drift:.2e}; cells within tolerance {cells}")
    return code


def _ort_jobs(work: Path) -> dict:
    """The models that notebooks evaluate with ONNX Runtime, with inputs and references as .npy."""
    import numpy as np
    import torch

    from mldeploy import export, training
    from mldeploy.quant import benchmark, int4_onnx, int8_ptq

    moons = training.train_two_moons()
    x = moons.split.x_test
    np.save(work / "moons_x.npy", x)
    np.save(work / "moons_ref.npy", training.predict_logits(moons.model, x).astype(np.float64))
    onnx_moons = export.export_onnx(moons.model, torch.from_numpy(x[:8]), work / "moons.onnx")
    bench = benchmark.lm_bench()
    np.save(work / "lm_x.npy", bench.x[:1024])
    np.save(work / "lm_y.npy", bench.y[:1024])
    np.save(work / "lm_ref.npy", bench.reference[:1024])
    np.save(work / "moons_y.npy", moons.split.y_test)
    int8_moons = int8_ptq.quantize_int8_qdq(
        onnx_moons, work / "moons_int8.onnx", moons.split.x_train
    )
    lm = {
        "LM FP32": bench.fp32_onnx,
        "LM INT8 dynamic": int8_ptq.quantize_int8_dynamic(bench.fp32_onnx, work / "dyn.onnx"),
        "LM INT8 static MinMax": int8_ptq.quantize_int8_qdq(
            bench.fp32_onnx, work / "qdq.onnx", bench.calibration[:1024]
        ),
        "LM INT4 RTN b32": int4_onnx.quantize_nbits_rtn(bench.fp32_onnx, work / "int4.onnx"),
    }
    jobs = {
        "two-moons max |ONNX - PyTorch|": {
            "kind": "maxdiff",
            "model": str(onnx_moons),
            "x": str(work / "moons_x.npy"),
            "reference": str(work / "moons_ref.npy"),
        }
    }
    for name, path in lm.items():
        jobs[f"{name} perplexity"] = {
            "kind": "perplexity",
            "model": str(path),
            "x": str(work / "lm_x.npy"),
            "y": str(work / "lm_y.npy"),
            "reference": str(work / "lm_ref.npy"),
        }
    jobs["two-moons INT8 accuracy"] = {
        "kind": "accuracy",
        "model": str(int8_moons),
        "x": str(work / "moons_x.npy"),
        "y": str(work / "moons_y.npy"),
    }
    return jobs


def _worker(jobs: dict, prefix: list[str]) -> dict[str, float]:
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", WORKER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=timeouts.scaled(3600),
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line]
        raise RuntimeError(f"exit {proc.returncode}: {lines[-1] if lines else '(no message)'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_kernels() -> int:
    """Pinned kernels and training steps natively and on an emulated Intel and AMD CPU; 1 if any
    differ."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("error: qemu-x86_64 not found (apt-get install -y qemu-user)", file=sys.stderr)
        return 2
    runs, sqrt = {}, {}
    for cpu in ("native", *QEMU_VENDORS):
        prefix = [] if cpu == "native" else [qemu, "-cpu", cpu]
        runs[cpu] = {**probe(KERNEL_PROBE, prefix), **probe(TRAINING_PROBE, prefix)}
        sqrt[cpu] = probe(MKL_SQRT_PROBE, prefix)["mkl_sqrt"]
        print(f"  {cpu:<11} " + "  ".join(f"{k} {v}" for k, v in runs[cpu].items()))
    same = all(digests == runs["native"] for digests in runs.values())
    print(
        "kernels and training under the pin: "
        + ("the same bits on every CPU" if same else "CPUs DIFFER")
    )
    agree = len(set(sqrt.values())) == 1
    print(f"MKL's sqrt (avoided by the library): {'agrees' if agree else 'differs'} ({sqrt})")
    return 0 if same else 1


def probe(
    code: str, prefix: Sequence[str] = (), env: dict[str, str] | None = None
) -> dict[str, str]:
    """Run a probe (``KERNEL_PROBE``, ``TRAINING_PROBE``, ...) in a fresh process, after
    ``prefix`` (e.g. ``qemu-x86_64 -cpu Haswell-v4``), without the caller's pin variables and with
    ``env`` added; return the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items() if k not in reproducibility.PINNED_ENV}
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=timeouts.scaled(1200),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ort() -> int:
    """ORT numbers natively and on an emulated Haswell; print the relative drift of each."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("error: qemu-x86_64 not found (apt-get install -y qemu-user)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    reproducibility.pin_compute_path()  # the reference models train as the notebooks' do
    with tempfile.TemporaryDirectory() as tmp:
        jobs = _ort_jobs(Path(tmp))
        native = _worker(jobs, [])
        print(f"evaluating {len(jobs)} models under qemu -cpu {QEMU_CPU} (slow: minutes) ...")
        emulated = _worker(jobs, [qemu, "-cpu", QEMU_CPU])
    rows = {}
    for name in native:
        a, b = emulated[name], native[name]
        drift = abs(a - b) / max(abs(b), 1e-12)
        rows[name] = {"native": b, "haswell": a, "relative_drift": drift}
        print(f"  {name:<38} native {b:<10.6g} haswell {a:<10.6g} relative drift {drift:.2e}")
    (OUT / "ort-drift.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["notebooks", "kernels", "ort"])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    if args.check == "ort":
        return run_ort()
    if args.check == "kernels":
        return run_kernels()
    notebooks = args.notebooks or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    return run_notebooks(notebooks)


if __name__ == "__main__":
    sys.exit(main())
