"""``custom_dataset`` functions of the shipped task YAMLs (lm-evaluation-harness loads this file
by path from a YAML's ``!function kjv.NAME``); the data is built by pretrain.eval.local_data."""

from pretrain.eval.local_data import load_task


def chapter_ppl(**_):
    """The held-out KJV chapters (``text``); lm-eval passes the task's metadata, unused here."""
    return load_task("kjv_chapter_ppl")


def verse_choice(**_):
    """The verse-ending questions (``context``, ``choices``, ``label``)."""
    return load_task("kjv_verse_choice")
