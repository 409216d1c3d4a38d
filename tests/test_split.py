"""The split: exact largest-remainder counts, content-only assignment, order independence."""

from __future__ import annotations

import random

import pytest

from job.split import row_key, split_counts, split_rows


@pytest.mark.parametrize(
    "total, ratios, counts",
    [
        (100, (0.85, 0.10, 0.05), [85, 10, 5]),
        (1000, (0.85, 0.10, 0.05), [850, 100, 50]),
        (101, (0.85, 0.10, 0.05), [86, 10, 5]),  # 85.85 / 10.1 / 5.05: the .85 gets the spare row
        (107, (0.85, 0.10, 0.05), [91, 11, 5]),  # 90.95 / 10.7 / 5.35
        (3, (0.85, 0.10, 0.05), [1, 1, 1]),  # every split gets a row, taken from train
        (10, (0.85, 0.10, 0.05), [8, 1, 1]),  # 8.5 / 1 / 0.5 -> 9/1/0 -> 8/1/1
        (7, (1 / 3, 1 / 3, 1 / 3), [3, 2, 2]),  # ties go to the earlier split
        (100, (0.71, 0.29, 0.0000001), [70, 29, 1]),  # 71/29/0, then the empty split takes a row from train
        (100, (0.5, 0.29, 0.21), [50, 29, 21]),  # 0.29 * 100 is 29 exactly, not 28.999...
        (999_983, (0.85, 0.10, 0.05), [849_986, 99_998, 49_999]),
    ],
)
def test_split_counts(total, ratios, counts):
    """Counts are the rounded shares, they add up to the total, and none is empty."""
    assert split_counts(total, ratios) == counts


def test_split_counts_always_sum_to_total():
    """Over many totals and ratios the counts sum exactly and stay within one row of the exact share."""
    rnd = random.Random(7)
    for _ in range(500):
        raw = [rnd.uniform(0.01, 1) for _ in range(3)]
        ratios = [r / sum(raw) for r in raw]
        total = rnd.randint(3, 50_000)
        counts = split_counts(total, ratios)
        assert sum(counts) == total
        assert min(counts) >= 1
        for count, ratio in zip(counts, ratios, strict=True):
            assert abs(count - total * ratio) < 1 + 1e-9 or count == 1


@pytest.mark.parametrize("total, ratios", [(2, (0.85, 0.1, 0.05)), (10, (0.9, 0.1, 0.0)), (10, (1.0, -0.5, 0.5))])
def test_split_counts_rejects_impossible(total, ratios):
    """Too few rows for three splits, or a non-positive share, is an error."""
    with pytest.raises(ValueError):
        split_counts(total, ratios)


def rows(n: int) -> list[bytes]:
    """n distinct canonical rows."""
    return [b'{"messages":[{"role":"user","content":"q%d"},{"role":"assistant","content":"a"}]}' % i for i in range(n)]


def test_split_ignores_input_order():
    """Shuffling the input yields the very same three lists, in the same (hash) order."""
    data = rows(1000)
    expected = split_rows(data, (0.85, 0.10, 0.05), 42)
    assert [len(p) for p in expected] == [850, 100, 50]
    for seed in range(3):
        shuffled = data[:]
        random.Random(seed).shuffle(shuffled)
        assert split_rows(shuffled, (0.85, 0.10, 0.05), 42) == expected


def test_split_is_a_partition_in_hash_order():
    """Every row lands in exactly one split; each split is sorted by the seeded hash."""
    data = rows(300)
    parts = split_rows(data, (0.6, 0.3, 0.1), 5)
    assert sorted(r for p in parts for r in p) == sorted(data)
    flat = [r for p in parts for r in p]
    assert [row_key(r, 5) for r in flat] == sorted(row_key(r, 5) for r in data)


def test_seed_changes_the_assignment():
    """A different seed moves rows between splits, with the same counts."""
    data = rows(1000)
    a = split_rows(data, (0.85, 0.10, 0.05), 42)
    b = split_rows(data, (0.85, 0.10, 0.05), 43)
    assert [len(p) for p in a] == [len(p) for p in b]
    assert set(a[1]) != set(b[1])


def test_adding_rows_keeps_most_assignments():
    """A row's split depends on content and seed: growing the data set by 1% moves only few rows."""
    data = rows(2000)
    before = split_rows(data[:1980], (0.85, 0.10, 0.05), 42)
    after = split_rows(data, (0.85, 0.10, 0.05), 42)
    moved = len(set(before[0]) - set(after[0]))
    assert moved <= 20


def test_row_key_depends_on_seed_and_content():
    """The key is a keyed hash: same input, same key; other seed or content, other key."""
    assert row_key(b"x", 1) == row_key(b"x", 1)
    assert row_key(b"x", 1) != row_key(b"x", 2)
    assert row_key(b"x", 1) != row_key(b"y", 1)
    assert len(row_key(b"x", 10**80)) == 16  # huge seeds still work
