"""The training stack as the training verbs use it: imported here, quieted once.

Importing this module is what needs the ``[train]`` extra; `metatt_deploy.cli` imports the
verb modules that import it only when one of their verbs runs, and names the extra when the
import fails.
"""

from __future__ import annotations

import os
import sys
import warnings

import datasets
import torch
import transformers


def quiet_libraries() -> None:
    """transformers' warnings off, and off a terminal datasets' progress bars (their redraws glue into fragments; ours print whole lines)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    # the ONNX exporter's tracing notes (TracerWarning, its legacy-exporter deprecation) are about the trace, which
    # the export's parity check verifies; printed, they bury the summary
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="optimum.*|torch.onnx.*")
    warnings.filterwarnings(
        "ignore", category=UserWarning, module="torch.onnx.*"
    )  # a file Arrow cannot read is our one-line error, not a log too
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
