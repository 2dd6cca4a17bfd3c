"""Tier 1: the label store: choices kept durably and exactly once under concurrent labellers and processes, and
read by the reward model as preference pairs."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from relay.labels import LabelStore
from relay.preferences import load_preferences


def label_all(path: str, labeller: str, choice: str) -> int:
    """One labelling client: takes the next comparison it has not labelled until none is left."""
    store, done = LabelStore(path), 0
    while (comparison := store.next_unlabelled(labeller)) is not None:
        store.label(comparison.id, choice, labeller)
        done += 1
    return done


def test_two_labelling_processes_at_once_lose_nothing_and_double_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    for index in range(60):
        store.add_comparison(f"{index}=", f"answer a{index}", f"answer b{index}", "iter_000010", "iter_000020")
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        done = pool.starmap(label_all, [(str(store.path), "ana", "a"), (str(store.path), "ben", "b")])
    assert done == [60, 60]
    assert store.counts() == {"a": 60, "b": 60, "tie": 0, "skip": 0, "comparisons": 60}


def test_a_labellers_second_choice_replaces_the_first_and_bad_choices_are_refused(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    first = store.add_comparison("1=", "1", "2", "x", "y")
    second = store.add_comparison("2=", "2", "3", "x", "y")
    assert store.next_unlabelled("ana").id == first
    store.label(first, "a", "ana")
    store.label(first, "b", "ana")  # a second thought
    store.label(first, "tie", "ben")
    assert store.counts() == {"a": 0, "b": 1, "tie": 1, "skip": 0, "comparisons": 2}
    assert store.next_unlabelled("ana").id == second
    assert store.next_unlabelled("cy").id == second  # the one nobody has labelled first
    with pytest.raises(ValueError, match="choice must be one of a, b, tie, skip, not 'c'"):
        store.label(second, "c", "ana")
    with pytest.raises(Exception):
        store.label(999, "a", "ana")  # no such comparison


def test_the_reward_model_reads_the_labels_as_preference_pairs(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    ids = [store.add_comparison(f"{n}=", f"good {n}", f"bad {n}", "x", "y") for n in range(4)]
    store.label(ids[0], "a", "ana")
    store.label(ids[1], "b", "ana")
    store.label(ids[2], "tie", "ana")
    store.label(ids[3], "skip", "ana")
    pairs = load_preferences(store.path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("0=", "good 0", "bad 0"), ("1=", "bad 1", "good 1")]
    with pytest.raises(ValueError, match="no such label store"):
        load_preferences(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
