"""FID of the first N samples of finished evals, so that evals run at different N can be
compared at one N. An eval's samples are drawn shard by shard from noise seeded by (seed,
shard) and conditions taken in turn, so the first N samples of an eval of M > N samples are
the samples an eval of N would draw (checked against a shipped N = 500 eval in docs/results.md):

    python benchmarks/fid_at_n.py 500 runs/pixart-s0/eval-*     # prints JSON: {eval dir: FID}

Uses the digits reference and digits-cnn features the testbed evals use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dit_compress.evaluate import fidelity as F


def fid_at(n: int, eval_dir: Path) -> float:
    report = json.loads((eval_dir / "report.json").read_text())
    samples = np.load(eval_dir / "samples.npz")["arr_0"]
    if len(samples) < n:
        raise SystemExit(f"{eval_dir} holds {len(samples)} samples, fewer than {n}")
    ref_kind, ref = F.resolve_reference(report.get("reference") or "digits", None)
    ex = F.choose_extractor(None, None, report["extractor"])
    return F.compute_metrics(samples[:n], ref_kind, ref, ["fid"], ex)["frechet_inception_distance"]


def main():
    n = int(sys.argv[1])
    print(json.dumps({str(d): fid_at(n, Path(d)) for d in sys.argv[2:]}, indent=1))


if __name__ == "__main__":
    main()
