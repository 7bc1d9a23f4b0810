"""Section 5.3: quantization library (fake quant, GPTQ, AWQ, INT8/INT4 ONNX, QAT), its targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_reference import fasterquant
from mldeploy import runtime
from mldeploy.quant import (
    awq,
    benchmark,
    charlm,
    fake_quant,
    gguf_export,
    gptq,
    int4_onnx,
    int8_ptq,
    metrics,
    qat,
    verdict,
    weight_only,
)
from mldeploy.quant.fake_quant import QuantSpec


@pytest.fixture(scope="module")
def bench() -> benchmark.LMBench:
    torch.set_num_threads(1)
    return benchmark.lm_bench()


@pytest.fixture(scope="module")
def fp32(bench: benchmark.LMBench) -> benchmark.Point:
    return benchmark.onnx_point(bench, "FP32", "FP32", bench.fp32_onnx)


# --- model and corpus ---------------------------------------------------------------------------


def test_corpus_is_fixed_text_and_windows_line_up():
    corpus = charlm.load_corpus()
    assert len(corpus.train) > 1_000_000 and len(corpus.valid) > 10_000
    assert charlm.decode(charlm.encode("def f(x):\n\treturn x")) == "def f(x):\n    return x"
    x, y = charlm.sample_windows(corpus.valid, 8, 5, seed=0)
    assert x.shape == (5, 8) and x.dtype == np.int64
    again_x, again_y = charlm.sample_windows(corpus.valid, 8, 5, seed=0)
    np.testing.assert_array_equal(x, again_x)
    positions = np.array([0, 17, len(corpus.valid) - 9])
    x, y = charlm.windows(corpus.valid, 8, positions)
    for p, row, target in zip(
        positions, x, y
    ):  # each target is the character right after its window
        np.testing.assert_array_equal(row, corpus.valid[p : p + 8])
        assert target == corpus.valid[p + 8]


def test_missing_stdlib_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not_a_module.py"):
        charlm.read_stdlib(("not_a_module.py",))


def test_training_is_bit_identical_run_to_run():
    cfg = charlm.CharLMConfig(context=8, embed=8, hidden=32, steps=20, batch_size=16)
    corpus = charlm.load_corpus()
    a, b = charlm.train_charlm(cfg, corpus), charlm.train_charlm(cfg, corpus)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert (
        cfg.key()
        != charlm.CharLMConfig(context=8, embed=8, hidden=32, steps=21, batch_size=16).key()
    )


def _key_with(charlm_source: str, root) -> str:
    """``CharLMConfig().key()`` computed by a fresh interpreter on a copy of the package whose
    ``charlm.py`` holds ``charlm_source``."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import mldeploy

    package = root / "mldeploy"
    shutil.copytree(Path(mldeploy.__file__).parent, package, ignore=shutil.ignore_patterns("*.pyc"))
    (package / "quant" / "charlm.py").write_text(charlm_source)
    code = "from mldeploy.quant import charlm; print(charlm.CharLMConfig().key())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={"PYTHONPATH": str(root)},
        text=True,
        capture_output=True,
        check=True,
    )
    return out.stdout.strip()


def test_cache_key_changes_with_the_training_code(tmp_path):
    import inspect

    source = inspect.getsource(charlm)
    assert "weight_decay=0.01" in source
    same = _key_with(source, tmp_path / "same")
    changed = _key_with(source.replace("weight_decay=0.01", "weight_decay=0.02"), tmp_path / "bug")
    assert same == charlm.CharLMConfig().key()
    assert changed != same


def test_atomic_output_replaces_in_one_step_and_cleans_up(tmp_path):
    from mldeploy.quant import cache

    target = tmp_path / "model.onnx"
    target.write_text("old")
    with cache.atomic_output(target) as a, cache.atomic_output(target) as b:
        assert a != b and a.parent == b.parent == tmp_path and a.suffix == ".onnx"
        a.write_text("first")
        b.write_text("second")
        assert target.read_text() == "old"  # nothing visible before the write completes
    assert target.read_text() == "first"  # the outer writer finished last
    with pytest.raises(RuntimeError), cache.atomic_output(target) as c:
        c.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_one_builder_lets_one_process_build_and_the_others_wait(tmp_path):
    import threading
    import time

    from mldeploy.quant import cache

    target, events = tmp_path / "model.pt", []

    def need(name: str) -> None:  # what cached_charlm and train_or_load do
        with cache.one_builder(target):
            if target.is_file():
                events.append(f"{name} loads {target.read_text()}")
                return
            time.sleep(0.3)  # training
            target.write_text(name)
            events.append(f"{name} trains")

    workers = [threading.Thread(target=need, args=(name,)) for name in ("a", "b", "c")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    trainer = events[0].split()[0]
    assert events[0] == f"{trainer} trains", events  # one trains, while the others wait
    assert sorted(events[1:]) == [f"{n} loads {trainer}" for n in "abc" if n != trainer], events


def test_large_model_is_big_enough_and_learned_something(bench, fp32):
    assert sum(p.numel() for p in bench.model.parameters()) >= 500_000
    assert fp32.perplexity < 0.2 * charlm.VOCAB_SIZE  # far better than guessing uniformly
    np.testing.assert_allclose(
        charlm.session_logits(runtime.make_session(bench.fp32_onnx), bench.x[:256]),
        bench.reference[:256],
        atol=1e-4,
    )


# --- quantizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 16), QuantSpec(3), QuantSpec(2, 32)])
def test_rtn_codes_in_range_and_error_within_half_a_step(spec):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    w[0, :5] = 0.0
    qw = fake_quant.rtn(w, spec)
    assert qw.codes.min() >= 0 and qw.codes.max() <= spec.qmax
    assert torch.equal(qw.codes, qw.codes.round())
    g = spec.groups(64)
    err = (qw.dequantize() - w).abs().reshape(24, g, -1)
    assert (err <= qw.scale[..., None] / 2 + 1e-6).all()
    assert (qw.dequantize()[0, :5] == 0).all()  # exact zeros stay exact
    torch.testing.assert_close(fake_quant.fake_quantize(w, spec), qw.dequantize())


def test_fake_quantize_passes_gradient_straight_through():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    (fake_quant.fake_quantize(w, QuantSpec(2, 16)) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)


def test_quant_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="groups of 48"):
        QuantSpec(4, 48).groups(64)


def test_gptq_lowers_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen) @ torch.randn(
        16, 64, generator=gen
    )  # low-rank: strong correlations
    w = torch.randn(32, 64, generator=gen)
    spec = QuantSpec(3)
    err_rtn = metrics.output_error(x, w, fake_quant.rtn(w, spec).dequantize())
    err_gptq = metrics.output_error(
        x, w, gptq.gptq_quantize(w, gptq.hessian(x), spec, block_size=16).dequantize()
    )
    assert err_gptq < 0.5 * err_rtn


def test_awq_helps_when_a_few_input_channels_dominate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=gen)
    x[:, :4] *= 20.0  # salient channels
    w = torch.randn(32, 64, generator=gen)
    spec = QuantSpec(3)
    s, alpha, history = awq.search_scale(w, x, spec, lambda inp, weight: inp @ weight.T)
    assert len(history) == awq.N_GRID and alpha > 0 and s.shape == (64,)
    w_hat = fake_quant.rtn(w * s, spec).dequantize() / s
    rtn_err = metrics.output_error(x, w, fake_quant.rtn(w, spec).dequantize())
    assert metrics.output_error(x, w, w_hat) < rtn_err
    # Clipping on top never does worse on the data it searched (bound 1.0 is in the grid).
    max_val = awq.search_clip(w * s, x / s, spec)
    clipped = fake_quant.rtn(awq.apply_clip(w * s, max_val), spec).dequantize() / s
    assert metrics.output_error(x, w, clipped) <= metrics.output_error(x, w, w_hat) * (1 + 1e-9)


@pytest.mark.parametrize("group_size", [None, 32, 128, 256])
def test_gptq_matches_the_reference_implementation_code_for_code(bench, group_size):
    """Same weight and Hessian into the library and into a line-by-line transcription of
    IST-DASLab/gptq (tests/gptq_reference.py): every integer code must be equal."""
    inputs = weight_only.layer_inputs(bench.model, bench.calibration[:4096])
    for name, layer in bench.model.linears().items():  # head has always-zero inputs
        w = layer.weight.detach().double()
        h = gptq.hessian(inputs[name])
        ours = gptq.gptq_quantize(w, h, QuantSpec(4, group_size))
        ref_q, ref_codes = fasterquant(w, h, 4, groupsize=group_size or -1)
        assert torch.equal(ours.codes, ref_codes), name
        assert torch.equal(ours.dequantize(), ref_q), name


def test_gptq_group_larger_than_block_takes_the_range_of_the_whole_group(bench):
    inputs = weight_only.layer_inputs(bench.model, bench.calibration[:4096])
    held_out = weight_only.layer_inputs(bench.model, bench.x)["fc1"]
    w = bench.model.fc1.weight.detach()
    spec = QuantSpec(4, 256)  # two blocks of 128 per group
    qw = gptq.gptq_quantize(w, gptq.hessian(inputs["fc1"]), spec, block_size=128)
    deq = qw.dequantize()
    # Nothing is clipped beyond half a step of the group's range...
    assert qw.codes.min() >= 0 and qw.codes.max() <= spec.qmax
    # ...and GPTQ beats RTN at the same group size on held-out inputs.
    rtn = fake_quant.rtn(w, spec).dequantize()
    assert metrics.output_error(held_out, w, deq) < 0.7 * metrics.output_error(held_out, w, rtn)


def test_awq_file_runs_like_the_awq_model_and_beats_rtn(bench, fp32):
    spec = QuantSpec(4, 128)
    point, model_q = benchmark.weight_only_point(bench, spec, "awq")
    path = bench.out_dir / "awq_4bit_g128.onnx"
    ops = int4_onnx.op_counts(path)
    assert ops["MatMulNBits"] == 3 and ops["Div"] == 1  # fc1's scale cannot be folded
    np.testing.assert_allclose(
        charlm.session_logits(runtime.make_session(path), bench.x[:256]),
        charlm.logits_of(model_q, bench.x[:256]),
        atol=1e-4,
    )
    rtn_model, _ = weight_only.quantize_model(bench.model, spec, "rtn")
    awq_err = weight_only.layer_errors(bench.model, model_q, bench.x)
    rtn_err = weight_only.layer_errors(bench.model, rtn_model, bench.x)
    for name in awq_err:
        assert awq_err[name] < 0.9 * rtn_err[name], name
    assert fp32.bytes / point.bytes >= 6.0


@pytest.mark.parametrize("fmt", ["Q4_K", "Q2_K"])
def test_kquant_encoder_is_read_bit_exactly_by_gguf(bench, fmt):
    import gguf

    w = bench.model.fc2.weight.detach().numpy()
    blocks = gguf_export.quantize_tensor(w, fmt)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt])
    per_block = blocks.shape[1] // (w.shape[1] // gguf_export.QK_K)
    ours = gguf_export.decode_kquant(blocks.reshape(-1, per_block), fmt).reshape(w.shape)
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))  # bit for bit
    step = {"Q4_K": 15, "Q2_K": 3}[fmt]
    sub = {"Q4_K": 32, "Q2_K": 16}[fmt]
    ranges = np.ptp(np.minimum(w.reshape(-1, sub), 0), axis=1) + np.ptp(w.reshape(-1, sub), axis=1)
    # Error bounded by a (quantized) sub-block step: min-max rounding, scales rounded to 6/4 bits.
    assert (np.abs(theirs - w).reshape(-1, sub).max(1) <= ranges / step + 1e-6).all()


def test_gguf_files_have_the_advertised_bits_and_keep_accuracy(bench, fp32, tmp_path):
    expected = {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5, "Q2_K": 2.625}
    for fmt, bpw in expected.items():
        path = gguf_export.write_gguf(bench.model, tmp_path / f"m_{fmt}.gguf", fmt)
        model, info = gguf_export.read_gguf(path)
        assert gguf_export.bits_per_weight(info, model) == bpw
        assert info["fc1.weight"][0] == fmt and info["embed.weight"][0] == "F32"
        ppl = benchmark.torch_point(bench, fmt, "GGUF", model, 1).perplexity
        assert ppl / fp32.perplexity - 1 < {"Q8_0": 0.002, "Q2_K": 0.1}.get(fmt, 0.01)


def test_verdict_names_a_winner_only_when_runs_separate():
    assert "no winner" in verdict.lower_is_better("A", [1.0, 1.2], "B", [1.1, 1.3])[0]
    en, zh = verdict.lower_is_better("A", [1.0, 1.1], "B", [1.2, 1.3])
    assert en.startswith("A is lower") and "A" in zh
    assert verdict.lower_is_better("A", [2.0, 2.1], "B", [1.2, 1.3])[0].startswith("B is lower")
    with pytest.raises(ValueError):
        verdict.summarize([1.0])


def test_quantize_model_validates_its_arguments(bench):
    with pytest.raises(ValueError, match="method"):
        weight_only.quantize_model(bench.model, QuantSpec(4), "sparsegpt")
    with pytest.raises(ValueError, match="calibration"):
        weight_only.quantize_model(bench.model, QuantSpec(4), "gptq")


# --- targets on the large model -----------------------------------------------------------------


def test_int8_dynamic_and_static_are_small_and_accurate(bench, fp32, tmp_path):
    files = [
        int8_ptq.quantize_int8_dynamic(bench.fp32_onnx, tmp_path / "dyn.onnx"),
        int8_ptq.quantize_int8_qdq(
            bench.fp32_onnx, tmp_path / "static.onnx", bench.calibration[:1024]
        ),
    ]
    for path in files:
        point = benchmark.onnx_point(bench, path.stem, "INT8", path)
        assert fp32.bytes / point.bytes >= 3.8
        assert abs(point.perplexity / fp32.perplexity - 1) <= 0.01
        assert point.agreement > 0.95


def test_int8_static_rejects_unknown_calibration(bench, tmp_path):
    with pytest.raises(ValueError, match="MinMax"):
        int8_ptq.quantize_int8_qdq(
            bench.fp32_onnx, tmp_path / "x.onnx", bench.calibration[:8], method="Median"
        )


@pytest.mark.parametrize("block_size", [32, 128])
def test_int4_onnx_is_six_times_smaller_with_no_fp32_weights_left(
    bench, fp32, tmp_path, block_size
):
    path = int4_onnx.quantize_nbits_rtn(
        bench.fp32_onnx, tmp_path / "int4.onnx", block_size=block_size
    )
    assert int4_onnx.op_counts(path).get("MatMulNBits") == 3 and "Gemm" not in int4_onnx.op_counts(
        path
    )
    leftovers = set(int4_onnx.float_weights(path))
    assert leftovers <= {"embed.weight"} | {f"{n}.weight_scales" for n in bench.model.linears()}
    point = benchmark.onnx_point(bench, "int4", "RTN", path)
    assert fp32.bytes / point.bytes >= 6.0
    assert abs(point.perplexity / fp32.perplexity - 1) <= 0.02


def test_without_gemm_rewrite_the_int4_quantizer_changes_nothing(bench, tmp_path):
    path = int4_onnx.quantize_nbits_rtn(bench.fp32_onnx, tmp_path / "same.onnx", rewrite_gemm=False)
    assert "MatMulNBits" not in int4_onnx.op_counts(path)
    assert "fc1.weight" in int4_onnx.float_weights(path)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(4, 32), QuantSpec(2, 64)])
def test_write_nbits_runs_in_onnx_runtime_like_the_dequantized_model(bench, tmp_path, spec):
    model_q, codes = weight_only.quantize_model(bench.model, spec, "rtn")
    path = int4_onnx.write_nbits(bench.fp32_onnx, tmp_path / "mine.onnx", codes)
    got = charlm.session_logits(runtime.make_session(path), bench.x[:256])
    np.testing.assert_allclose(got, charlm.logits_of(model_q, bench.x[:256]), atol=1e-4)
    if spec.bits == 4:  # same asymmetric min-max rounding as ONNX Runtime's own quantizer
        theirs = int4_onnx.quantize_nbits_rtn(
            bench.fp32_onnx, tmp_path / "ort.onnx", block_size=spec.group_size
        )
        floats = {name: layer.weight for name, layer in bench.model.linears().items()}
        total, ties, other = int4_onnx.compare_codes(theirs, codes, floats)
        assert other == 0 and ties < 10 and total == sum(w.numel() for w in floats.values())


def test_compare_codes_sees_a_changed_code_and_forgives_only_ties(bench, tmp_path):
    _, codes = weight_only.quantize_model(bench.model, QuantSpec(4, 128), "rtn")
    floats = {name: layer.weight for name, layer in bench.model.linears().items()}
    path = int4_onnx.write_nbits(bench.fp32_onnx, tmp_path / "mine.onnx", codes)
    total, ties, other = int4_onnx.compare_codes(path, codes, floats)
    assert other == 0 and total > 0
    tie = codes["fc2"].rounding_ties(floats["fc2"])
    # a code moved by one step where no tie is counts
    row, col = [int(i[0]) for i in torch.nonzero(~tie & (codes["fc2"].codes < 15), as_tuple=True)]
    codes["fc2"].codes[row, col] += 1
    assert int4_onnx.compare_codes(path, codes, floats)[2] == 1
    # a weight put exactly half-way between two codes is forgiven
    qw = codes["fc2"]
    group = col // 128
    floats["fc2"] = floats["fc2"].detach().clone()
    floats["fc2"][row, col] = (
        torch.floor(floats["fc2"][row, col] / qw.scale[row, group]) + 0.5
    ) * qw.scale[row, group]
    assert qw.rounding_ties(floats["fc2"])[row, col]
    assert int4_onnx.compare_codes(path, codes, floats)[2] == 0


def test_pack_codes_puts_the_first_value_in_the_low_bits():
    codes = np.array([[1, 2, 3, 0, 3, 3, 0, 1]])
    packed = int4_onnx.pack_codes(codes, bits=2, block_size=8)
    assert packed.shape == (1, 1, 2)
    assert packed[0, 0, 0] == 1 | 2 << 2 | 3 << 4 | 0 << 6
    assert int4_onnx.pack_codes(np.array([[5, 10]]), bits=4, block_size=2)[0, 0, 0] == 5 | 10 << 4


def test_gptq_beats_rtn_at_4_bit_per_channel(bench):
    spec = QuantSpec(4)
    rtn_model, _ = weight_only.quantize_model(bench.model, spec, "rtn")
    gptq_model, _ = weight_only.quantize_model(bench.model, spec, "gptq", bench.calibration)
    rtn_err = weight_only.layer_errors(bench.model, rtn_model, bench.x)
    gptq_err = weight_only.layer_errors(bench.model, gptq_model, bench.x)
    for name in rtn_err:  # measured on held-out windows, not on the calibration data
        assert rtn_err[name] >= 2.0 * gptq_err[name], name
    rtn_point = benchmark.torch_point(bench, "rtn", "RTN", rtn_model, 1)
    gptq_point = benchmark.torch_point(bench, "gptq", "GPTQ", gptq_model, 1)
    assert gptq_point.kl <= 0.9 * rtn_point.kl


def test_qat_and_budget_matched_ptq_over_seeds(bench, tmp_path):
    """The robust facts, over two seeds: at 2 bits both QAT and budget-matched GPTQ stay far below
    budget-matched RTN, and the extra FP32 steps alone improve the model."""
    spec, steps = QuantSpec(2, 128), 100
    runs, seconds = qat.qat_vs_ptq(bench, spec, steps=steps, seeds=(1, 2))
    assert seconds["QAT"] > 0 and seconds["FP32 fine-tuning"] > 0
    base = benchmark.torch_point(bench, "fp32", "FP32", bench.model, 1).perplexity
    assert max(runs["FP32 fine-tuned"]) < base
    for better in ("QAT", "PTQ GPTQ"):
        assert max(runs[better]) < 0.97 * min(runs["PTQ RTN"]), better
    # The converted QAT model is exactly the codes: its 2-bit ONNX file computes the same logits.
    qat_model, codes = qat.qat_finetune(bench.model, bench.corpus.train, spec, steps=20)
    qat_bench = benchmark.bench_for(bench, qat_model, "test-qat")
    path = int4_onnx.write_nbits(qat_bench.fp32_onnx, tmp_path / "qat.onnx", codes)
    np.testing.assert_allclose(
        charlm.session_logits(runtime.make_session(path), bench.x[:256]),
        charlm.logits_of(qat_model, bench.x[:256]),
        atol=1e-4,
    )


def test_missing_model_files_and_unknown_layers_are_clear_errors(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        int8_ptq.quantize_int8_dynamic(tmp_path / "absent.onnx", tmp_path / "out.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        int4_onnx.quantize_nbits_rtn(tmp_path / "absent.onnx", tmp_path / "out.onnx")
    codes = {"fc9": fake_quant.rtn(bench.model.fc2.weight.detach(), QuantSpec(4, 32))}
    with pytest.raises(ValueError, match="fc9"):
        int4_onnx.write_nbits(bench.fp32_onnx, tmp_path / "out.onnx", codes)


def test_estimated_size_matches_a_real_packed_file(bench, tmp_path):
    spec = QuantSpec(4, 32)
    _, codes = weight_only.quantize_model(bench.model, spec, "rtn")
    real = benchmark.sizes.artifact_bytes(
        int4_onnx.write_nbits(bench.fp32_onnx, tmp_path / "b32.onnx", codes)
    )
    estimate = benchmark.estimated_bytes(bench, spec)
    assert (
        abs(estimate - real) / real < 0.05
    )  # the estimate only differs in how zero points are packed


def test_a_change_that_rounds_to_zero_prints_without_a_minus_sign():
    assert f"{benchmark.change_pct(10.1819, 10.1820):+.2f}" == "+0.00"
    assert benchmark.change_pct(10.2, 10.0) == pytest.approx(2.0)


def test_the_int8_perplexity_trend_sees_a_fall_of_a_third_of_a_percent():
    """The INT8 perplexity moves by tenths of a percent with the calibration size; a ±5% band, right
    for GPTQ's layer errors, would call any such curve flat."""
    rows = [(16, {"fc1": 1.0}, 10.216), (256, {"fc1": 0.9}, 10.207), (4096, {"fc1": 0.5}, 10.183)]
    (_, fc1), (_, ppl) = verdict.calibration_trends(rows)
    assert fc1.startswith("fc1: falls") and ppl.startswith("INT8 ppl: falls")
    flat = [(16, {"fc1": 1.0}, 10.216), (4096, {"fc1": 0.5}, 10.2165)]
    assert "stays within ±0.1%" in verdict.calibration_trends(flat)[1][1]
