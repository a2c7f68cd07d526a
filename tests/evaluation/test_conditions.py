"""The conditions `test` generates, drawn as each reference draws them."""

from collections import Counter

import pytest
import torch

from migm.data.collection import ConditionDataset


def _classes(ds):
    return [ds[j][0] for j in range(len(ds))]


def test_cycle_is_the_embedded_default_and_prompt_j_for_a_prompt_table():
    assert _classes(ConditionDataset(25, 10)) == [j % 10 for j in range(25)]
    assert _classes(ConditionDataset(3, 3)) == [0, 1, 2]                 # condition j = prompt j
    assert [ConditionDataset(25, 10)[j][1] for j in (0, 24)] == [0, 24]  # the index fixes the seed


def test_shuffled_is_maskgits_rule_each_class_equally_often_in_a_seeded_random_order():
    # the reference samples with the labels of its shuffled ImageNet-val loader: 50 per class
    ds = ConditionDataset(50_000, 1000, order="shuffled", seed=0)
    classes = _classes(ds)
    assert set(Counter(classes).values()) == {50}
    assert classes != sorted(classes) and classes[:1000] != list(range(1000))
    first = Counter(classes[:5000])                 # a random order: no class bunched at the start
    assert len(first) > 980 and max(first.values()) < 20     # ~5 classes are expected missing
    assert classes == _classes(ConditionDataset(50_000, 1000, order="shuffled", seed=0))   # reproducible
    assert classes != _classes(ConditionDataset(50_000, 1000, order="shuffled", seed=1))


def test_shuffled_prefixes_stay_balanced_and_work_through_a_loader():
    ds = ConditionDataset(25, 10, order="shuffled", seed=3)
    counts = Counter(_classes(ds))
    assert sum(counts.values()) == 25 and max(counts.values()) <= 3 and set(counts) == set(range(10))
    cond, index = next(iter(torch.utils.data.DataLoader(ds, batch_size=25)))
    assert cond.tolist() == _classes(ds) and index.tolist() == list(range(25))


def test_an_unknown_order_is_an_error():
    with pytest.raises(ValueError, match="expected cycle or shuffled"):
        ConditionDataset(10, 10, order="random")


def test_the_test_datamodule_takes_the_order_as_a_field():
    from migm.data.datamodule import TrajectoryDataModule
    dm = TrajectoryDataModule(dirs=[], test_samples=20, test_batch_size=20, num_classes=10,
                              test_conditions="shuffled", seed=5)
    cond, _ = next(iter(dm.test_dataloader()))
    assert cond.tolist() == _classes(ConditionDataset(20, 10, order="shuffled", seed=5))
    assert sorted(cond.tolist()) == sorted(list(range(10)) * 2)
