"""The short summary `make demo` ends with (tools/main_job.sh): accuracy, parity, latency, and where the reports are.

    python tools/demo_summary.py RUN/train exported/NAME

RUN/train is a finished `metatt-deploy train` output (its metrics.json), exported/NAME the export
that `metatt-deploy validate` checked (its report is exported/NAME.validation.json beside it).
Every figure, with the settings it was measured at, stays in those report files; these are the
few lines a person reads at the end of a run. The summary is a function of the two reports, so
tests/test_readme.py runs it on the reports the README's own commands write and a renamed field
fails there instead of at the end of a demo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ONNX = "onnxruntime (this export)"
EAGER = "pytorch eager (adapter unmerged)"


def summary(train_dir: Path, export: Path) -> list[str]:
    """The summary's lines, from the run's metrics.json and the export's validation report."""
    m = json.loads((train_dir / "metrics.json").read_text())
    report = export.with_name(f"{export.name}.validation.json")
    v = json.loads(report.read_text())
    p, trained = v["parity"], m["trainable_parameters"]
    lines = [
        f"accuracy: {m['test']['accuracy']:.4f} on the test split (PyTorch adapter, best epoch; "
        f"{trained['adapter']:,} adapter + {trained['head']:,} head parameters trained)"
    ]
    if v["accuracy"]:
        lines.append(
            f"          PyTorch {v['accuracy']['pytorch']:.4f}, ONNX {v['accuracy']['onnx']:.4f} on the {v['data']['examples']:,} validated examples"
        )
    tolerance = f"tolerance {p['tolerance']:.0e}" if p["enforced"] else "reported only"
    lines.append(
        f"parity:   ONNX vs unmerged adapter max |logit diff| {p['max_abs_logit_diff']:.2e} ({tolerance}, "
        f"{'passed' if p['passed'] else 'FAILED'}); labels agree on {p['label_agreement']:.1%}"
    )
    p50 = {(r["runtime"], r["provider"], r["batch"]): r["p50_ms"] for r in v["latency"]["results"]}
    for s in v["latency"]["speedups"]:
        onnx, eager = p50[(ONNX, s["provider"], s["batch"])], p50[(EAGER, "cpu", s["batch"])]
        lines.append(
            f"latency:  batch {s['batch']}: ONNX Runtime {onnx:.1f} ms, PyTorch eager {eager:.1f} ms (p50; {s['onnx_vs_pytorch_cpu']:.2f}x)"
        )
    lines.append(
        f"files:    {export}/ (the bundle); {export.with_name(export.name + '.validation.md')} and .json (the full report); "
        f"{train_dir / 'metrics.md'}"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir", type=Path, help="the train output folder (holds metrics.json)")
    parser.add_argument("export", type=Path, help="the validated export folder (NAME.validation.json sits beside it)")
    args = parser.parse_args(argv)
    print("\n== summary")
    print("\n".join(summary(args.train_dir, args.export)))


if __name__ == "__main__":
    main()
