"""The data of the task YAMLs shipped in pretrain/eval/tasks, built from the built-in King James
corpus (``builtin:kjv``) into a cache folder, so lm-evaluation-harness runs with no hub access.

Both tasks read the chapters that `pretrain prepare` holds out for validation at the default
``data.valid_fraction`` (see :func:`pretrain.data.prepare.is_valid_document`), so a model trained
on ``builtin:kjv`` with the defaults is scored on text it never trained on:

- ``kjv_chapter_ppl`` (rolling loglikelihood): one document per held-out chapter, its verses
  joined by newlines exactly as ``prepare`` reads them; word and byte perplexity, bits per byte.
- ``kjv_verse_choice`` (multiple choice): the first half of a held-out verse (cut at the word
  nearest its middle), and four endings: its own and the second halves of three other held-out
  verses, drawn with a fixed seed.

The files are a function of the corpus alone (fixed seeds, sorted inputs): they are written once
per format version under :func:`cache_dir` (atomically) and never committed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

FORMAT_VERSION = 1
"""Bump when the construction changes: the cached files carry it in their names."""
VALID_FRACTION = 0.01
"""The default data.valid_fraction: the chapters it holds out are the tasks' documents."""
CHOICES = 4
SEED = 1234


def cache_dir() -> Path:
    """``$PRETRAIN_CACHE/eval``, else ``$XDG_CACHE_HOME/pretrain/eval``, else ``~/.cache/pretrain/eval``."""
    root = os.environ.get("PRETRAIN_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain")
    return Path(root) / "eval"


def held_out_chapters() -> list[list[str]]:
    """The verses of each KJV chapter held out at :data:`VALID_FRACTION`, in corpus order."""
    from pretrain.data.prepare import is_valid_document
    from pretrain.data.sources import builtin_files

    chapters: list[list[str]] = []
    key = None
    with open(builtin_files("kjv")[0], encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            k = (verse["book"], verse["chapter"])
            if k != key:
                chapters.append([])
                key = k
            chapters[-1].append(verse["text"])
    return [c for i, c in enumerate(chapters) if is_valid_document(i, VALID_FRACTION)]


def chapter_records() -> list[dict]:
    """``{"text": chapter}`` per held-out chapter (verses joined by newlines, as in training)."""
    return [{"text": "\n".join(verses)} for verses in held_out_chapters()]


def _halves(verse: str) -> tuple[str, str] | None:
    words = verse.split()
    if len(words) < 4:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def verse_choice_records() -> list[dict]:
    """``{"context", "choices", "label"}`` per held-out verse of at least four words."""
    pairs = [h for verses in held_out_chapters() for v in verses if (h := _halves(v)) is not None]
    endings = sorted({end for _, end in pairs})
    rng = random.Random(SEED)
    records = []
    for context, ending in pairs:
        others = rng.sample([e for e in endings if e != ending], CHOICES - 1) if len(endings) > CHOICES else []
        label = rng.randrange(len(others) + 1)
        choices = others[:label] + [ending] + others[label:]
        records.append({"context": context, "choices": choices, "label": label})
    return records


_BUILDERS = {"kjv_chapter_ppl": chapter_records, "kjv_verse_choice": verse_choice_records}


def task_file(name: str) -> Path:
    """The jsonl file of the shipped task ``name`` (a key of ``_BUILDERS``), built on first use."""
    path = cache_dir() / f"{name}-v{FORMAT_VERSION}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in _BUILDERS[name]()), encoding="utf-8")
        os.replace(tmp, path)  # concurrent builders write the same bytes; the last rename wins
    return path


def load_task(name: str):
    """``{"test": datasets.Dataset}`` of the shipped task ``name`` (the form lm-evaluation-harness
    takes from a task's ``custom_dataset``)."""
    import datasets

    path = task_file(name)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(records)}
