"""Section 5.1: export a PyTorch model to TorchScript, ``torch.export`` (.pt2) and ONNX, and measure
the files. ``formats`` writes the files; ``sizes`` measures them."""

from mldeploy.export.formats import (
    MAX_BATCH,
    contains_text,
    explain_export_failure,
    export_all,
    export_onnx,
    export_program,
    export_torchscript,
    quiet_export,
    save_state_dict,
    strip_onnx_metadata,
    strip_torchscript_debug,
)

__all__ = [
    "MAX_BATCH",
    "save_state_dict",
    "contains_text",
    "strip_torchscript_debug",
    "export_torchscript",
    "export_program",
    "explain_export_failure",
    "strip_onnx_metadata",
    "export_onnx",
    "export_all",
    "quiet_export",
]
