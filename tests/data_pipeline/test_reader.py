"""Reader: exactly-once split over ranks x workers, per-epoch reshuffle, truncated shards."""

from __future__ import annotations

import logging
import tarfile
from collections import Counter

import pytest

from data_pipeline.reader import ShardStream, make_loader, read_epoch, smallest_rank_share, split_shards
from data_pipeline.shards import list_shards, read_manifest


def _keys(shards, world_size, num_workers, **kw) -> list[str]:
    return [s["key"] for r in range(world_size)
            for s in read_epoch(shards, rank=r, world_size=world_size, num_workers=num_workers, **kw)]


def test_exactly_once_2_ranks_2_workers(digits_dir):
    """Union over 2 ranks x 2 real DataLoader workers is every key exactly once."""
    keys = _keys(list_shards(digits_dir), 2, 2, shuffle_buffer=100, seed=3, epoch=1)
    assert Counter(keys).most_common(1)[0][1] == 1
    assert set(keys) == set(read_manifest(digits_dir).column("key").to_pylist())


def test_exactly_once_sample_level_split(digits_dir):
    """With fewer shards (3) than readers (2 x 2) the sample-level split still gives every key exactly once."""
    shards = list_shards(digits_dir)[:3]
    keys = _keys(shards, 2, 2, shuffle_buffer=50)
    names = {s.rsplit("/", 1)[1] for s in shards}
    expected = {r["key"] for r in read_manifest(digits_dir).to_pylist() if r["shard"] in names}
    assert len(keys) == len(set(keys)) == 3 * 256
    assert set(keys) == expected


def test_split_modes():
    """split_shards: shard-level when shards >= readers, sample-level (stride N) otherwise."""
    shards = [f"s{i}" for i in range(5)]
    parts = [split_shards(shards, reader=g, num_readers=4, seed=0, epoch=0) for g in range(4)]
    assert all(stride == 1 for _, stride in parts)
    assert sorted(s for p, _ in parts for s in p) == shards
    assert split_shards(shards, reader=1, num_readers=8, seed=0, epoch=0)[1] == 8


def test_one_shard_path_given_as_a_str_is_refused_in_one_line(digits_dir):
    """A single path where a list of them belongs (`read_epoch("x.tar", ...)`, a Path to the dataset) is refused in
    one line before any reading: it had been read as shards named by its characters, each counted as unreadable, and
    the epoch came out empty without an error."""
    from pathlib import Path

    from data_pipeline.loader import make_train_stream
    from data_pipeline.views import AugmentConfig

    shard = list_shards(digits_dir)[0]
    with pytest.raises(ValueError, match=r"^shards: a list of .* got the single str '.*shard-000000\.tar'$"):
        list(read_epoch(shard, rank=0, world_size=1, num_workers=0))
    with pytest.raises(ValueError, match=r"^shards: a list of shard paths .* got the single PosixPath '.*digits"):
        make_train_stream(Path(digits_dir), batch_size=2, aug=AugmentConfig.disabled(), image_size=8, channels=3,
                          rank=0, world_size=1)
    assert len(list(read_epoch([shard], rank=0, world_size=1, num_workers=0))) == 256


@pytest.mark.parametrize(("sizes", "world", "workers"), [([12, 12, 12], 2, 1), ([256] * 7 + [5], 2, 1),
                                                      ([50, 3, 40, 7, 9], 2, 2), ([30, 20], 2, 2), ([5, 5, 5], 1, 0)])
def test_smallest_rank_share_is_the_least_an_epoch_gives(sizes, world, workers):
    """What preflight checks a batch against: no epoch gives a rank fewer samples (shards go whole to its readers, or
    samples one by one where there are fewer shards than readers), and some epoch gives one exactly that few."""
    k = max(1, workers)
    shards = [f"s{i}" for i in range(len(sizes))]
    size = dict(zip(shards, sizes))
    shares = set()
    for epoch in range(200):
        for rank in range(world):
            got = 0
            for w in range(k):
                paths, stride = split_shards(shards, reader=rank * k + w, num_readers=world * k, seed=0, epoch=epoch)
                got += sum(size[p] for p in paths) if stride == 1 else len(range(rank * k + w, sum(sizes), stride))
            shares.add(got)
    assert smallest_rank_share(sizes, world_size=world, num_workers=workers) == min(shares)


def test_epoch_reshuffle_differs_and_reproduces(digits_dir):
    """Order differs between epochs, and is identical for the same (seed, epoch)."""
    shards = list_shards(digits_dir)
    run = lambda seed, epoch: _keys(shards, 2, 2, shuffle_buffer=200, seed=seed, epoch=epoch)  # noqa: E731
    e0 = run(0, 0)
    assert run(0, 0) == e0
    e1 = run(0, 1)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    assert run(1, 0) != e0


def _cut(path, where: str) -> None:
    """Truncate a tar inside the data of its 100th member, or exactly at that member's header."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[100]
    offset = member.offset_data + 10 if where == "mid_member" else member.offset
    path.write_bytes(path.read_bytes()[:offset])


@pytest.mark.parametrize("where", ["mid_member", "at_header"])
def test_truncated_shard_counted_and_skipped(digits_copy, caplog, where):
    """A truncated tar is counted once, warned about once, and the other shards are read in full."""
    victim = digits_copy / "shard-000004.tar"
    _cut(victim, where)
    stream = ShardStream(list_shards(digits_copy), rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=0,
                         epoch=0)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        chunks = list(make_loader(stream))
    keys = [s["key"] for c in chunks for s in c["samples"]]
    assert sum(c["truncated"] for c in chunks) == 1
    assert len([r for r in caplog.records if "shard-000004.tar" in r.getMessage()]) == 1
    assert len(keys) == len(set(keys))
    # 7 complete shards + the 33 samples (3 members each: cls, png, txt) wholly before the cut in the 100th member
    assert len(keys) == 1797 - 256 + 33


@pytest.mark.parametrize("num_workers", [2])
def test_truncated_count_reaches_main_process(digits_copy, num_workers):
    """Counts from worker processes arrive in the main process, once per truncated shard (2 ranks x 2 workers)."""
    for name in ("shard-000001.tar", "shard-000006.tar"):
        victim = digits_copy / name
        victim.write_bytes(victim.read_bytes()[:3000])
    total = 0
    for rank in range(2):
        stream = ShardStream(list_shards(digits_copy), rank=rank, world_size=2, num_workers=num_workers,
                             shuffle_buffer=10, seed=0, epoch=0)
        total += sum(c["truncated"] for c in make_loader(stream))
    assert total == 2


def test_missing_shard_counted(digits_copy):
    """A shard file that vanished is counted like a truncated one and the rest is read."""
    (digits_copy / "shard-000003.tar").unlink()
    stream = ShardStream(list_shards(digits_copy), rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=0,
                         epoch=0)
    chunks = list(make_loader(stream))
    assert sum(c["truncated"] for c in chunks) == 1
    assert sum(len(c["samples"]) for c in chunks) == 1797 - 256
