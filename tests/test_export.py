"""Export round-trips, the trace-vs-script trap, ONNX parity and artifact sizes."""

import onnx
import pytest
import torch

from mldeploy import export, models, runtime
from mldeploy.export import sizes
from mldeploy.paths import REPO_ROOT


def test_every_format_round_trips_to_the_same_logits(trained_model, split, exported):
    x = torch.from_numpy(split.x_test)
    with torch.no_grad():
        expected = trained_model(x)
    restored = models.SimpleMLP()
    restored.load_state_dict(torch.load(exported["Native PyTorch (.pt)"], weights_only=True))
    outputs = {
        "state_dict": restored.eval()(x),
        "trace": torch.jit.load(str(exported["TorchScript trace (.pt)"]))(x),
        "script": torch.jit.load(str(exported["TorchScript script (.pt)"]))(x),
        "pt2": torch.export.load(exported["torch.export (.pt2)"]).module()(x),
    }
    for name, out in outputs.items():
        assert torch.allclose(out.detach(), expected, atol=1e-6), name


def test_onnx_matches_pytorch_on_batch_sizes_never_seen_at_export(trained_model, exported):
    session = runtime.make_session(exported["ONNX (.onnx)"])
    rows = runtime.check_parity(trained_model, session, [1, 3, 8, 257, 4096])
    assert [r.batch_size for r in rows] == [1, 3, 8, 257, 4096]
    assert max(r.share for r in rows) <= 1.0
    assert max(r.max_abs_diff for r in rows) <= 1e-4  # float32 noise, not a wrong graph


def test_parity_check_fails_loudly_on_a_different_model(exported):
    session = runtime.make_session(exported["ONNX (.onnx)"])
    torch.manual_seed(123)
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        runtime.check_parity(models.SimpleMLP(), session, [4])


def test_onnx_file_is_self_contained_valid_and_has_a_dynamic_named_batch(exported):
    path = exported["ONNX (.onnx)"]
    assert not path.with_name(path.name + ".data").exists()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    batch, features = inp.type.tensor_type.shape.dim
    assert batch.dim_param and features.dim_value == 2
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_trace_freezes_the_branch_script_and_cond_keep_both(tmp_path):
    gate = models.SignGate()
    pos, neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]])
    traced = torch.jit.load(str(export.export_torchscript(gate, pos, tmp_path / "t.pt", "trace")))
    scripted = torch.jit.load(
        str(export.export_torchscript(gate, pos, tmp_path / "s.pt", "script"))
    )
    assert torch.equal(traced(pos), gate(pos))
    assert not torch.equal(traced(neg), gate(neg))  # the trap: the positive branch was frozen in
    assert torch.equal(scripted(neg), gate(neg)) and torch.equal(scripted(pos), gate(pos))
    assert "torch.export cannot capture" in export.explain_export_failure(gate, pos)
    pair = torch.cat([pos, pos])
    program = torch.export.load(
        export.export_program(models.SignGateCond(), pair, tmp_path / "c.pt2")
    )
    assert torch.equal(program.module()(neg), gate(neg)) and torch.equal(
        program.module()(pos), gate(pos)
    )


def test_sizes_are_positive_ordered_as_measured_and_free_of_local_paths(exported):
    measured = {name: sizes.artifact_bytes(path) for name, path in exported.items()}
    assert all(n > 0 for n in measured.values())
    # ONNX keeps only weights and a small graph; TorchScript adds code; .pt2 adds a JSON graph.
    assert (
        measured["ONNX (.onnx)"]
        < measured["Native PyTorch (.pt)"]
        < measured["TorchScript trace (.pt)"]
    )
    assert measured["TorchScript trace (.pt)"] < measured["torch.export (.pt2)"]
    weights = 4 * models.count_parameters(models.SimpleMLP())
    assert all(n > weights for n in measured.values())
    for name, path in exported.items():
        assert not export.contains_text(path, str(REPO_ROOT)), f"{name} embeds a local path"


def test_unstripped_exports_do_embed_local_paths(trained_model, split, tmp_path):
    example = torch.from_numpy(split.x_train[:8])
    path = export.export_torchscript(
        trained_model, example, tmp_path / "raw.pt", "trace", strip_debug=False
    )
    assert export.contains_text(path, str(REPO_ROOT))
    assert export.strip_torchscript_debug(path) > 0
    assert not export.contains_text(path, str(REPO_ROOT))
    assert torch.equal(torch.jit.load(str(path))(example), trained_model(example))


def test_bad_export_arguments_raise(trained_model, tmp_path):
    with pytest.raises(ValueError, match="trace"):
        export.export_torchscript(
            trained_model, torch.zeros(1, 2), tmp_path / "x.pt", method="compile"
        )
    with pytest.raises(ValueError, match="at least 2 rows"):
        export.export_onnx(trained_model, torch.zeros(1, 2), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        sizes.artifact_bytes(tmp_path / "missing.onnx")
