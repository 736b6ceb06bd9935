"""Speech corpora: the LibriSpeech layout (FLAC + trans.txt, or HF parquet) and a synthetic one."""

from pinch_ray.corpus.librispeech import (
    SplitListing,
    Utterance,
    detect_layout,
    list_split,
    read_bytes,
    read_utterances,
    resolve_filesystem,
    write_hf_parquet,
)
from pinch_ray.corpus.synth import generate_corpus

__all__ = ["SplitListing", "Utterance", "detect_layout", "generate_corpus",
           "list_split", "read_bytes", "read_utterances", "resolve_filesystem", "write_hf_parquet"]
