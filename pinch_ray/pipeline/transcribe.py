"""Transcription on a Ray Data actor pool: the finalize stage's evaluation when
``evaluation.num_actors`` > 0, one GPU per actor when the cluster has GPUs."""

from __future__ import annotations

import numpy as np
import ray
import ray.data
import torch

from pinch_ray.core.export import model_from_bytes, model_to_bytes
from pinch_ray.core.scoring import Utterance, transcribe_batch
from pinch_ray.data.batches import collate


class Transcriber:
    """``map_batches`` callable (one per actor): loads the model once, transcribes numpy batches.

    ``model_ref``: a Ray object ref of ``export.model_to_bytes(model)``, so the weights travel
    through the object store (no shared filesystem needed). Uses CUDA when the actor has a GPU.
    """

    def __init__(self, model_ref, processor):
        model = model_from_bytes(ray.get(model_ref))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.processor = processor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{"id": i, "audio": np.asarray(a, dtype=np.float32), "labels": labels, "text": t}
                for i, a, labels, t in zip(batch["id"], batch["audio"], batch["labels"], batch["text"])]
        padded = collate(rows)
        hypotheses = transcribe_batch(self.model, self.processor, padded)
        return {"id": np.array(padded["ids"], dtype=object), "reference": np.array(padded["texts"], dtype=object),
                "hypothesis": np.array(hypotheses, dtype=object)}


def transcribe_dataset(dataset, model, processor, *, batch_size: int = 16, num_actors: int = 1,
                       num_gpus: float | None = None) -> list[Utterance]:
    """Transcribe a Ray Dataset of shard rows on an actor pool; returns utterances sorted by id.

    ``model``: a plain HF model (no gates: pass ``export.pruned_copy(model)``).

    ``num_gpus`` per actor: None = 1 if the Ray cluster has GPUs, else 0. Ray must be initialised.
    """
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    model_ref = ray.put(model_to_bytes(getattr(model, "module", model)))
    results = dataset.select_columns(["id", "audio", "labels", "text"]).map_batches(
        Transcriber, fn_constructor_kwargs={"model_ref": model_ref, "processor": processor},
        batch_size=batch_size, batch_format="numpy", num_gpus=num_gpus,
        compute=ray.data.ActorPoolStrategy(size=num_actors))
    rows = results.take_all()
    return sorted((Utterance(str(r["id"]), str(r["reference"]), str(r["hypothesis"])) for r in rows),
                  key=lambda u: u.id)
