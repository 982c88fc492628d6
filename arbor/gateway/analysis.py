"""The ``analysis`` command: the demo's code analysis of a Python tree, run as one job."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from arbor.demo.analysis import analyze_file, list_python_files, merge_summaries, summarize


class AnalysisParams(BaseModel):
    """Parameters of the ``analysis`` command."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        default=None,
        max_length=4096,
        description="Absolute folder to analyse; default the Python standard library. It must "
        "lie inside the standard library or a folder of ARBOR_GATEWAY_ANALYSIS_ROOTS.",
    )
    batch_size: int = Field(default=50, ge=1, le=10_000, description="Files per progress event.")
    top: int = Field(default=10, ge=1, le=100, description="Most complex functions reported.")
    max_files: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Analyse only the first N files, sorted."
    )

    @field_validator("source")
    @classmethod
    def _source_allowed(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The gateway passes its allowed roots as context; the command actor re-validates
        # the already-checked parameters without it.
        roots = (info.context or {}).get("analysis_roots")
        if value is None or roots is None:
            return value
        if "\x00" in value or not os.path.isabs(value):
            raise ValueError("source must be an absolute folder path")
        real = os.path.realpath(value)
        allowed = [os.path.realpath(sysconfig.get_paths()["stdlib"])]
        allowed += [os.path.realpath(root) for root in roots if root]
        if not any(real == root or real.startswith(root + os.sep) for root in allowed):
            raise ValueError(
                "source is outside the folders the gateway may read; add its parent to "
                "ARBOR_GATEWAY_ANALYSIS_ROOTS"
            )
        return value


def run_analysis(params: dict[str, Any], progress: Callable[[str, Any], None]) -> dict[str, Any]:
    """Analyse every ``.py`` file of the source tree, reporting one event per batch.

    Returns:
        The summary of `arbor.demo.analysis.summarize`: counts, the most complex functions
        and the files that failed to parse.
    """
    options = AnalysisParams.model_validate(params)
    root = options.source or sysconfig.get_paths()["stdlib"]
    files = list_python_files(root)
    if options.max_files is not None:
        files = files[: options.max_files]
    batches = [
        files[start : start + options.batch_size]
        for start in range(0, len(files), options.batch_size)
    ]
    progress("started", {"files": len(files), "batches": len(batches)})
    summary = summarize([], options.top)
    for index, batch in enumerate(batches, start=1):
        results = [analyze_file(root, path) for path in batch]
        summary = merge_summaries(summary, summarize(results, options.top), options.top)
        progress(
            "progress",
            {"batch": index, "batches": len(batches), "files_done": summary["files"]},
        )
    return summary


# The gateway validates the request's parameters with this model before starting.
run_analysis.params_model = AnalysisParams  # type: ignore[attr-defined]
