"""The design-principles table of section 5.4.4, in both languages, from the parsed Dockerfile and
the measured dependency footprints."""

from __future__ import annotations

from mldeploy.book import bilingual
from mldeploy.image import dockerfile, footprint

MB = 1e6


def principles_table(
    parsed: dockerfile.Dockerfile,
    serve_reqs: list,
    onnx_fp: footprint.Footprint,
    torch_fp: footprint.Footprint,
) -> bilingual.Table:
    """Each principle, how the Dockerfile follows it, and what is measured or checked about it."""
    final = parsed.final
    exact = sum(str(r.specifier).startswith("==") for r in serve_reqs)
    onnx_mb, torch_mb = f"{onnx_fp.total / MB:.0f} MB", f"{torch_fp.total / MB:.0f} MB"
    unpinned = len(onnx_fp.sizes) - len(serve_reqs)
    rows = [
        [
            ("最小基础镜像", "minimal base image"),
            f"{final.base} -> {parsed.stage(final.base).base}",
            "—",
        ],
        [
            ("多阶段构建", "multi-stage build"),
            f"{len(parsed.stages)} stages, default target '{final.name}'",
            (f"依赖 {onnx_mb}，而不是 {torch_mb}", f"deps {onnx_mb} instead of {torch_mb}"),
        ],
        [
            ("非 root 用户", "non-root user"),
            "USER " + final.last("USER").args,
            ("服务进程的 UID 由契约测试检查", "server UID checked by the contract test"),
        ],
        [
            "HEALTHCHECK",
            " ".join(final.last("HEALTHCHECK").exec_form()),
            ("退出码在 5.4.6 中测量", "exit codes measured in 5.4.6"),
        ],
        [
            ("固定版本", "pinned versions"),
            f"{exact}/{len(serve_reqs)} direct requirements with ==",
            (f"{unpinned} 个传递依赖未固定", f"{unpinned} transitive unpinned"),
        ],
    ]
    columns = [
        ("原则", "principle"),
        ("Dockerfile 中的做法", "in the Dockerfile"),
        ("测量", "measured"),
    ]
    return bilingual.table(columns, rows)
