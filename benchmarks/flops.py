"""Counts the forward FLOPs of a network (PyTorch's FlopCounterMode: 2 per multiply-add), for % of peak.

    python -m benchmarks.flops --network concat --image-size 300
"""

from __future__ import annotations

import argparse

from benchmarks.common import emit


def forward_flops(network: str, image_size: int) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from covid_cxr.models import build_model

    model = build_model(network, image_size=image_size).eval()
    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    by_op = {str(op): float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"forward_gflop": counter.get_total_flops() / 1e9, "by_op_gflop": {k: v / 1e9 for k, v in by_op.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="concat")
    parser.add_argument("--image-size", type=int, default=300)
    args = parser.parse_args()
    emit({"task": "flops", "network": args.network, "image_size": args.image_size,
          **forward_flops(args.network, args.image_size)})


if __name__ == "__main__":
    main()
