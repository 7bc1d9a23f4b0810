"""The demo script end to end, as `make demo` runs it."""

import re
import socket
import subprocess
import sys

from mldeploy import timeouts
from mldeploy.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "code" / "serve_model.py"


def _run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeouts.scaled(600),
        **kwargs,
    )


def test_demo_runs_all_eight_steps_and_releases_its_port(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in range(1, 9):
        assert f"[{step}/8]" in out
    assert "All deployment steps completed successfully!" in out
    assert "GET /health  -> 200" in out and "POST /predict -> 200" in out
    assert len(re.findall(r"-> class=[01]", out)) == 5
    # keep-alive median of 50: about 1 ms; a delayed ACK per request (no TCP_NODELAY) is 44 ms
    latency_ms = float(re.search(r"API latency: +([\d.]+) ms \(median of 50 requests\)", out)[1])
    assert latency_ms < 15, out
    port = int(re.search(r"127\.0\.0\.1:(\d+)", out).group(1))
    with socket.socket() as sock:  # the port is free again: nothing was left listening
        sock.bind(("127.0.0.1", port))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "model.pt2",
        "model_int8.onnx",
        "model_state_dict.pt",
        "model_ts_script.pt",
        "model_ts_trace.pt",
    ]


def test_demo_rejects_bad_arguments_with_a_message():
    proc = _run("--epochs", "zero")
    assert proc.returncode == 2 and "expected a positive whole number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failing_step_is_named_and_exits_nonzero(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    proc = _run("--out", str(blocker))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "artifact folder" in proc.stderr or "failed" in proc.stderr


def test_a_failing_step_stops_the_demo_with_its_name(tmp_path, monkeypatch, capsys):
    from mldeploy import pipeline
    from mldeploy.quant import int8_ptq

    def broken(*args, **kwargs):
        raise RuntimeError("calibration data reader exhausted")

    monkeypatch.setattr(int8_ptq, "quantize_int8_qdq", broken)
    assert pipeline.main(["--out", str(tmp_path), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "step 6/8 (Post-training INT8 quantization) failed" in err
    assert "calibration data reader exhausted" in err
