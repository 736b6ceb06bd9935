"""Synthetic English speech corpus in the LibriSpeech layout (espeak-ng, fully offline).

Real speech from the espeak-ng engine bundled in the ``espeakng-loader`` wheel (called through
ctypes: no system package), 16 speakers (8 voice variants x 2 rate/pitch settings), sentences
from a template grammar over ~400 words (contractions included), disjoint between splits.
Audio is resampled 22,050 -> 16,000 Hz (torchaudio) and written as mono 16-bit FLAC::

    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac
    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("UTT-ID TRANSCRIPT" lines)
    <out>/synth_corpus.json                                            (settings; written last)

Example (about 45 s for 6,000 utterances on 2 cores)::

    pinch-ray corpus synth data/synth_corpus --utterances 6000 --seed 0

Determinism: the plan (sentence, speaker, id of every utterance) is drawn sequentially from one
``random.Random(seed)``. espeak-ng keeps hidden synthesis state between utterances in a process
(pitch flutter phase, echo buffer, ...), so utterances are synthesized in chunks fixed by the
corpus size (:func:`chunk_size`), each in a fresh worker process: the audio is identical for any
number of workers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import multiprocessing
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pinch_ray import storage
from pinch_ray.data.librispeech import resampler

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Hz, the written FLAC files
ESPEAK_SAMPLE_RATE = 22050  # Hz, what espeak-ng synthesizes
# Utterances are synthesized in at most MAX_CHUNKS chunks of at least MIN_CHUNK_UTTERANCES, each
# in a fresh worker process (see the module docstring; a process start costs ~0.4 s).
MAX_CHUNKS = 32
MIN_CHUNK_UTTERANCES = 64
DEFAULT_SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}  # split name -> fraction of utterances
MARKER = "synth_corpus.json"


@dataclass(frozen=True)
class Speaker:
    speaker_id: int  # LibriSpeech-style integer id (directory name)
    voice: str  # espeak-ng voice name (+variant)
    rate: int  # words per minute
    pitch: int  # espeak pitch, 0..100 (50 = voice default)


# Eight espeak-ng voices (`en` is British English; `en-gb` is no voice name in this build).
# Not `+f2`/`+f3`/`+f5`: their breath noise differs from run to run, which breaks reproducibility.
_VOICES = ("en-us", "en", "en-us+m3", "en-us+f1", "en-gb-x-rp+m5", "en-gb-x-rp+f4",
           "en-gb-scotland+m7", "en-us-nyc+klatt")
_PROSODY = ((165, 45), (185, 60))  # (rate wpm, pitch) pairs, one speaker per voice and pair
SPEAKERS = tuple(Speaker(1001 + i, voice, rate, pitch)
                 for i, (voice, (rate, pitch)) in enumerate((v, p) for p in _PROSODY for v in _VOICES))

# ---------------------------------------------------------------------------------------------
# Sentence grammar
# ---------------------------------------------------------------------------------------------

_NAMES = ("john mary peter anna thomas lucy james emma david sarah robert alice henry clara george "
          "helen frank grace paul ruth arthur edith walter martha charles rose samuel julia oliver "
          "nora").split()
_NOUNS = ("house garden river city window table letter horse village mountain road forest ship door "
          "book child mother father friend teacher doctor farmer king queen soldier captain dog cat "
          "bird tree flower stone field morning evening winter summer storm fire water bread money "
          "paper picture kitchen bridge church market station train boat island lake valley hill "
          "castle tower wall garden gate chair basket apple orange coat hat boot shirt lamp clock "
          "bell song story question answer island meadow cottage harbour lantern bottle candle "
          "blanket ladder bucket wagon carriage stranger neighbour sister brother uncle family "
          "school office library museum theatre").split()
_ADJECTIVES = ("old young little big small tall short happy sad angry quiet loud bright dark warm cold "
               "green red blue white black yellow brown heavy light empty full clean dirty strange "
               "famous gentle clever brave careful lucky early late new broken wooden golden silver "
               "narrow wide deep simple tired hungry busy proud").split()
# (base, past, -ing) of transitive verbs
_VERBS = (("see", "saw", "seeing"), ("find", "found", "finding"), ("open", "opened", "opening"),
          ("carry", "carried", "carrying"), ("paint", "painted", "painting"),
          ("watch", "watched", "watching"), ("follow", "followed", "following"),
          ("remember", "remembered", "remembering"), ("build", "built", "building"),
          ("clean", "cleaned", "cleaning"), ("close", "closed", "closing"),
          ("bring", "brought", "bringing"), ("buy", "bought", "buying"), ("sell", "sold", "selling"),
          ("read", "read", "reading"), ("write", "wrote", "writing"), ("love", "loved", "loving"),
          ("visit", "visited", "visiting"), ("leave", "left", "leaving"), ("keep", "kept", "keeping"),
          ("hold", "held", "holding"), ("move", "moved", "moving"), ("fix", "fixed", "fixing"),
          ("draw", "drew", "drawing"), ("lose", "lost", "losing"), ("break", "broke", "breaking"),
          ("catch", "caught", "catching"), ("count", "counted", "counting"),
          ("pull", "pulled", "pulling"), ("push", "pushed", "pushing"), ("wash", "washed", "washing"),
          ("fill", "filled", "filling"), ("send", "sent", "sending"), ("take", "took", "taking"),
          ("need", "needed", "needing"), ("forget", "forgot", "forgetting"),
          ("cover", "covered", "covering"), ("guard", "guarded", "guarding"))
# (base, past) of intransitive verbs of motion or state
_INTRANSITIVE = (("walk", "walked"), ("run", "ran"), ("wait", "waited"), ("sit", "sat"),
                 ("stand", "stood"), ("sleep", "slept"), ("sing", "sang"), ("dance", "danced"),
                 ("swim", "swam"), ("climb", "climbed"), ("rest", "rested"), ("play", "played"),
                 ("work", "worked"), ("travel", "travelled"), ("hide", "hid"))
_ADVERBS = ("quickly slowly quietly happily carefully suddenly often never always softly loudly "
            "gladly early together alone").split()
_PREPOSITIONS = "in near behind across under beside over through into towards along around".split()
_TIMES = ("today", "tomorrow", "yesterday", "last night", "this morning", "every day", "at noon",
          "in the evening", "after dinner", "before sunrise", "on sunday", "next week")
_DETERMINERS = ("the", "a", "that", "this", "my", "her", "his", "our", "their", "your")
_BE_CONTRACTIONS = ("i'm", "you're", "he's", "she's", "it's", "we're", "they're")
_WILL_CONTRACTIONS = ("i'll", "you'll", "he'll", "she'll", "we'll", "they'll")
_NEG_DO = ("didn't", "doesn't", "don't", "can't", "couldn't", "won't", "wouldn't", "shouldn't")
_NEG_BE = ("isn't", "wasn't")
_HAVE = ("i've", "we've", "you've", "they've")


def _sentence(rng: random.Random) -> str:
    """One lower-case sentence (4-9 words, ~1.5-2.5 s of speech) from the template grammar."""
    c = rng.choice
    verb, intr = c(_VERBS), c(_INTRANSITIVE)
    templates = (
        lambda: f"{c(_DETERMINERS)} {c(_ADJECTIVES)} {c(_NOUNS)} {verb[1]} {c(_DETERMINERS)} {c(_NOUNS)}",
        lambda: f"{c(_NAMES)} {verb[1]} the {c(_NOUNS)} {c(_PREPOSITIONS)} the {c(_NOUNS)}",
        lambda: f"{c(_NAMES)} {c(_NEG_DO)} {verb[0]} the {c(_ADJECTIVES)} {c(_NOUNS)}",
        lambda: f"{c(_BE_CONTRACTIONS)} {verb[2]} {c(_DETERMINERS)} {c(_NOUNS)} {c(_TIMES)}",
        lambda: f"the {c(_NOUNS)} {c(_NEG_BE)} {c(_ADJECTIVES)} {c(_TIMES)}",
        lambda: f"{c(_NAMES)}'s {c(_NOUNS)} is {c(_ADJECTIVES)} and {c(_ADJECTIVES)}",
        lambda: f"{c(_WILL_CONTRACTIONS)} {verb[0]} the {c(_NOUNS)} {c(_TIMES)}",
        lambda: f"there's a {c(_ADJECTIVES)} {c(_NOUNS)} {c(_PREPOSITIONS)} the {c(_NOUNS)}",
        lambda: f"{c(_NAMES)} and {c(_NAMES)} {verb[1]} {c(_DETERMINERS)} {c(_ADJECTIVES)} {c(_NOUNS)}",
        lambda: f"why {c(_NEG_BE)} the {c(_NOUNS)} {c(_ADJECTIVES)}",
        lambda: f"{c(_NAMES)} {intr[1]} {c(_ADVERBS)} {c(_PREPOSITIONS)} the {c(_ADJECTIVES)} {c(_NOUNS)}",
        lambda: f"{c(_HAVE)} {c(_ADVERBS)} {intr[1]} {c(_PREPOSITIONS)} the {c(_NOUNS)}",
        lambda: f"let's {intr[0]} {c(_PREPOSITIONS)} the {c(_NOUNS)} {c(_TIMES)}",
    )
    return c(templates)()


def vocabulary() -> set[str]:
    """Every word the grammar can produce (for tests and documentation)."""
    words = set(_NAMES + _NOUNS + _ADJECTIVES + _ADVERBS + _PREPOSITIONS)
    words |= {w for v in _VERBS for w in v} | {w for v in _INTRANSITIVE for w in v}
    words |= {w for t in _TIMES for w in t.split()}
    words |= set(_DETERMINERS + _BE_CONTRACTIONS + _WILL_CONTRACTIONS + _NEG_DO + _NEG_BE + _HAVE)
    words |= {f"{n}'s" for n in _NAMES} | {"is", "and", "there's", "why", "let's"}
    return words


# ---------------------------------------------------------------------------------------------
# Plan: which sentence, speaker and id every utterance gets (sequential, seed-determined)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedUtterance:
    split: str
    utterance_id: str  # <speaker>-<chapter>-<NNNN>
    text: str  # LibriSpeech style: upper case, apostrophes kept
    voice: str
    rate: int
    pitch: int

    @property
    def relative_dir(self) -> str:
        speaker, chapter, _ = self.utterance_id.split("-")
        return f"{self.split}/{speaker}/{chapter}"


def split_counts(num_utterances: int, split_fractions: dict[str, float]) -> dict[str, int]:
    """Utterances per split: every split but the first gets round(N * fraction), the first the rest."""
    names = list(split_fractions)
    counts = {name: round(num_utterances * split_fractions[name]) for name in names[1:]}
    counts = {names[0]: num_utterances - sum(counts.values()), **counts}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"split_fractions {split_fractions} sum to more than 1")
    return counts


def plan_corpus(num_utterances: int, seed: int = 0,
                split_fractions: dict[str, float] | None = None) -> list[PlannedUtterance]:
    """Sentences (unique over the whole corpus, hence disjoint between splits) and speakers.

    Raises ValueError when the grammar cannot supply that many distinct sentences.
    """
    split_fractions = dict(split_fractions or DEFAULT_SPLITS)
    rng = random.Random(seed)
    used: set[str] = set()
    per_chapter: dict[tuple[int, int], int] = defaultdict(int)
    plan = []
    for split_index, (split, count) in enumerate(split_counts(num_utterances, split_fractions).items()):
        for _ in range(count):
            for _attempt in range(1000):
                sentence = _sentence(rng)
                if sentence not in used:
                    break
            else:
                raise ValueError(f"cannot draw {num_utterances} distinct sentences from the grammar")
            used.add(sentence)
            speaker = rng.choice(SPEAKERS)
            chapter = speaker.speaker_id * 10 + split_index + 1
            number = per_chapter[speaker.speaker_id, chapter]
            per_chapter[speaker.speaker_id, chapter] += 1
            plan.append(PlannedUtterance(split, f"{speaker.speaker_id}-{chapter}-{number:04d}",
                                         sentence.upper(), speaker.voice, speaker.rate, speaker.pitch))
    return plan


# ---------------------------------------------------------------------------------------------
# espeak-ng through ctypes (one engine per process: its state is global)
# ---------------------------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """The espeak-ng engine of this process. ``synthesize`` returns int16 samples at 22,050 Hz."""

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                           espeakng_loader.get_data_path().encode(), 0)
        if rate != ESPEAK_SAMPLE_RATE:
            raise RuntimeError(f"espeak-ng initialisation failed or runs at {rate} Hz "
                               f"(expected {ESPEAK_SAMPLE_RATE}); check the espeakng-loader install")
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # keep a reference: C holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, _events):
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples [T] at 22,050 Hz. Raises ValueError for a voice name this build lacks."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
        self._lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode()
        error = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed with code {error} for {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _synthesize_chunk(out_dir: str, chunk: list[PlannedUtterance]) -> list[tuple[str, int]]:
    """Worker: synthesize, resample and write one chunk; returns (utterance id, samples) pairs."""
    import soundfile
    import torch

    torch.set_num_threads(1)
    engine = Espeak()
    resample = resampler(ESPEAK_SAMPLE_RATE, SAMPLE_RATE)
    written = []
    for utt in chunk:
        samples = engine.synthesize(utt.text.lower(), utt.voice, utt.rate, utt.pitch)
        with torch.no_grad():
            audio = resample(torch.from_numpy(samples.astype(np.float32) / 32768.0)).numpy()
        path = Path(out_dir, utt.relative_dir, f"{utt.utterance_id}.flac")
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        written.append((utt.utterance_id, len(audio)))
    return written


def chunk_size(num_utterances: int) -> int:
    """Utterances per synthesis chunk; depends on the corpus size only, never on the workers."""
    return max(MIN_CHUNK_UTTERANCES, -(-num_utterances // MAX_CHUNKS))


def _pool(num_workers: int):
    """Worker processes forked from a clean fork server (no Ray / OpenMP threads inherited), each
    used for one chunk only, so espeak-ng starts every chunk from the same state."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "torch", "torchaudio", "soundfile", __name__])
    return context.Pool(num_workers, maxtasksperchild=1)


def generate_corpus(out_dir: str | os.PathLike, num_utterances: int = 6000, seed: int = 0,
                    split_fractions: dict[str, float] | None = None,
                    num_workers: int | None = None, progress: bool = True) -> dict:
    """Write a synthetic corpus in the LibriSpeech layout; returns its summary (also in MARKER).

    Idempotent: an existing corpus with the same settings is kept as is. The corpus is written to
    a temporary sibling directory and renamed into place, with ``synth_corpus.json`` written last.
    ``num_workers`` (default: all cores) does not change the output.

    Raises FileExistsError when ``out_dir`` exists but holds something else, ValueError for bad
    settings.
    """
    import tqdm

    out_dir = Path(out_dir)
    split_fractions = dict(split_fractions or DEFAULT_SPLITS)
    if num_utterances < 1:
        raise ValueError(f"num_utterances must be >= 1 (got {num_utterances})")
    if any(f < 0 for f in split_fractions.values()) or abs(sum(split_fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be >= 0 and sum to 1 (got {split_fractions})")
    settings = {"num_utterances": num_utterances, "seed": seed, "split_fractions": split_fractions,
                "sample_rate": SAMPLE_RATE, "speakers": [asdict(s) for s in SPEAKERS],
                "chunk_utterances": chunk_size(num_utterances)}
    marker = out_dir / MARKER
    if marker.exists():
        summary = json.loads(marker.read_text())
        if summary.get("settings") == settings:
            logger.info("synthetic corpus %s already complete; kept", out_dir)
            return summary
        raise FileExistsError(f"{out_dir} holds a synthetic corpus with other settings; "
                              "delete it or choose another output directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new output directory")

    started = time.perf_counter()
    plan = plan_corpus(num_utterances, seed, split_fractions)
    storage.remove_stale_tmp(out_dir)
    with storage.atomic_dir(out_dir) as tmp_dir:  # replaces the empty out_dir, if any (checked above)
        size = chunk_size(len(plan))
        chunks = [plan[i:i + size] for i in range(0, len(plan), size)]
        num_workers = max(1, min(num_workers or os.cpu_count() or 1, len(chunks)))
        num_samples: dict[str, int] = {}
        with _pool(num_workers) as pool, tqdm.tqdm(total=len(plan), unit="utt", desc="synthesize",
                                                   disable=not progress) as bar:
            for written in pool.imap_unordered(functools.partial(_synthesize_chunk, str(tmp_dir)), chunks):
                num_samples.update(written)
                bar.update(len(written))

        transcripts: dict[str, list[str]] = defaultdict(list)
        for utt in plan:
            transcripts[utt.relative_dir].append(f"{utt.utterance_id} {utt.text}")
        for relative_dir, lines in transcripts.items():
            speaker, chapter = relative_dir.split("/")[1:]
            Path(tmp_dir, relative_dir, f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")

        seconds = time.perf_counter() - started
        summary = {
            "settings": settings,
            "utterances": {split: sum(u.split == split for u in plan) for split in split_fractions},
            "hours": round(sum(num_samples.values()) / SAMPLE_RATE / 3600, 4),
            "mean_duration_s": round(sum(num_samples.values()) / SAMPLE_RATE / len(plan), 3),
            "generation_seconds": round(seconds, 2),
            "utterances_per_second": round(len(plan) / seconds, 1),
        }
        (tmp_dir / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("synthetic corpus: %d utterances (%.2f h) in %s, %.1f utt/s",
                len(plan), summary["hours"], out_dir, summary["utterances_per_second"])
    return summary
