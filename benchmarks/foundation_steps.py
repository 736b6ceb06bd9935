"""Whether two code trees train a shipped foundation alike: three dense optimizer steps from the
foundation's preset (its overrides from foundation.json; the Compressor a foundation run uses,
method dense, no Ray) on fixed random batches, every random source seeded; prints one JSON object
with a digest of the initial and of the trained weights. Run it with each tree first on the path
and compare the digests (docs/architecture.md, "Shipped foundations and their provenance"):

    git archive b2524e2 pinch_ray | tar -x -C /tmp/b2524e2
    PYTHONPATH=/tmp/b2524e2 python benchmarks/foundation_steps.py synth-tiny

It reads foundation.json from this checkout (the file beside this script), so an old tree without
foundations still gets the overrides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

FOUNDATIONS = Path(__file__).resolve().parents[1] / "pinch_ray" / "foundations"


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.state_dict().values())).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("foundation", help="a shipped foundation's name, e.g. synth-tiny")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    record = json.loads((FOUNDATIONS / args.foundation / "foundation.json").read_text())

    import pinch_ray
    from pinch_ray.config import GateConfig, TrainConfig
    from pinch_ray.core.compressor import Compressor
    from pinch_ray.core.models import CHAR_VOCAB, load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = load_model(record["model"]["preset"], seed=0, **record["model"]["overrides"])
    initial = digest(model)
    train = TrainConfig(max_steps=args.steps, batch_size=4, lr=record["training"]["lr"], warmup_steps=1, torch_threads=1)
    run = Compressor.create(model, "dense", 0.0, train, GateConfig())
    batches = torch.Generator().manual_seed(1)
    torch.manual_seed(2), np.random.seed(2), random.seed(2)  # dropout (torch), SpecAugment's time masks (numpy)
    for _ in range(args.steps):
        run.step([{"input_values": torch.randn(4, 16000, generator=batches),
                   "attention_mask": torch.ones(4, 16000, dtype=torch.long),
                   "labels": torch.randint(5, len(CHAR_VOCAB), (4, 12), generator=batches)}])
    print(json.dumps({"foundation": args.foundation, "code": str(Path(pinch_ray.__file__).parents[1]),
                      "initial": initial, f"after_{args.steps}_steps": digest(run.model),
                      "vocabulary": hashlib.sha256(json.dumps(CHAR_VOCAB).encode()).hexdigest()[:12]}))


if __name__ == "__main__":
    main()
