"""A wide, randomly initialised MLP built directly as ONNX (no torch): a model heavy enough to show
what batching buys. Same interface as the two-moons model: (n, 2) floats in, (n, 2) logits out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_wide_mlp(path: str | Path, *, hidden: int = 1024, layers: int = 3, n_features: int = 2,
                   n_classes: int = 2, seed: int = 0) -> Path:
    """Write ``n_features → hidden (× layers, ReLU) → n_classes`` to ``path``; weights He-initialised."""
    if hidden < 1 or layers < 1:
        raise ValueError("hidden and layers must be positive")
    rng = np.random.default_rng(seed)
    sizes = [n_features] + [hidden] * layers + [n_classes]
    nodes, inits, x = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    graph = helper.make_graph(
        nodes, "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="mldeploy")
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path
