"""Shard datasets served over HTTP (data_pipeline.remote) by a real server on 127.0.0.1: read as the same directory
on disk is, a dropped connection or a missing shard counted as truncated and skipped, 5xx retried, an Authorization
header sent, and a dataset URL that does not answer refused in one line before anything starts."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from data_pipeline.reader import Counts, iter_reader, read_epoch
from data_pipeline.remote import AUTH_ENV, open_url
from data_pipeline.shards import list_shards
from pretrain.config import ConfigError, DataConfig
from pretrain.data import resolve_shards
from tests.http_fixture import serve


def _config(source: str) -> DataConfig:
    return dataclasses.replace(DataConfig(), source=source)


def test_served_dataset_reads_as_on_disk(digits_dir):
    """resolve_shards gives the shards' URLs; 2 ranks x 2 loader workers read from them the very samples, in the very
    order, that they read from the directory."""
    with serve(digits_dir.parent) as (base, seen):
        url = f"{base}/{digits_dir.name}/"
        shards = resolve_shards(_config(url))
        assert shards == [f"{base}/{digits_dir.name}/shard-{i:06d}.tar" for i in range(8)]
        for rank in (0, 1):
            served = list(read_epoch(shards, rank=rank, world_size=2, num_workers=2, shuffle_buffer=100, epoch=1))
            local = list(read_epoch(list_shards(digits_dir), rank=rank, world_size=2, num_workers=2,
                                    shuffle_buffer=100, epoch=1))
            assert served == local and len(served) > 700
        assert all(seen[f"/{digits_dir.name}/shard-{i:06d}.tar"] == 1 for i in range(8))  # by 1 of the 4 readers


def test_dropped_connection_and_missing_shard_are_truncated(digits_copy):
    """A shard whose connection drops halfway, and one the server no longer has (404): each counted once as truncated
    and skipped (what was read of the first is kept); the other shards read in full."""
    (digits_copy / "shard-000003.tar").unlink()
    with serve(digits_copy.parent) as (base, _):
        shards = resolve_shards(_config(f"{base}/{digits_copy.name}"))
        shards[5] = shards[5].replace(base, f"{base}/drop")
        counts = Counts()
        samples = list(iter_reader(shards, reader=0, num_readers=1, seed=0, epoch=0, shuffle_buffer=0, counts=counts))
    assert counts.truncated == 2 and counts.corrupt == 0
    assert 256 * 5 + 5 < len(samples) < 1797 - 256  # 5 whole shards of 256, the last one of 5, part of shard 5


def test_retries_server_errors_not_client_errors(digits_dir):
    """503 twice, then the file: opened on the third attempt; a 404 fails at once, naming the URL."""
    with serve(digits_dir.parent, flaky=2) as (base, seen):
        url = f"{base}/flaky/{digits_dir.name}/manifest.parquet"
        with open_url(url, backoff_s=0.01) as f:
            assert f.read() == (digits_dir / "manifest.parquet").read_bytes()
        assert seen[f"/flaky/{digits_dir.name}/manifest.parquet"] == 3
        with pytest.raises(OSError, match=r"/nope\.tar: HTTP 404 File not found$"):
            open_url(f"{base}/{digits_dir.name}/nope.tar", backoff_s=0.01)
        assert seen[f"/{digits_dir.name}/nope.tar"] == 1


def test_authorization_header_and_refusals(digits_dir, tmp_path, monkeypatch):
    """A server that wants a token: refused in one line without PRETRAIN_HTTP_AUTHORIZATION, read with it; a URL
    without a dataset, and a served dataset without captions for CLIP, refused in one line too."""
    shutil.copytree(digits_dir, tmp_path / "d")
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with serve(tmp_path, token="Bearer s3cr3t") as (base, _):
        with pytest.raises(ConfigError) as e:
            resolve_shards(_config(f"{base}/d"))
        assert str(e.value) == (f"data.source: no manifest.parquet at {base}/d ({base}/d/manifest.parquet: HTTP 401 "
                                "Unauthorized)")
        monkeypatch.setenv(AUTH_ENV, "Bearer s3cr3t")
        shards = resolve_shards(_config(f"{base}/d"), captions=True)  # the digits have captions
        assert len(list(read_epoch(shards, rank=0, world_size=1, num_workers=0))) == 1797
        with pytest.raises(ConfigError, match=r"^data\.source: no manifest\.parquet at .*/elsewhere \(.*HTTP 404"):
            resolve_shards(_config(f"{base}/elsewhere"))


def test_evaluate_and_embed_a_served_dataset(digits_dir, tmp_path):
    """`pretrain eval --dataset URL` scores a served labelled dataset as the same directory on disk, and `pretrain
    embed --data URL` keeps the URL as the index's data."""
    import pyarrow.parquet as pq

    from pretrain.cli import main
    from pretrain.evaluate import evaluate_checkpoint
    from tests.util import write_run

    write_run(tmp_path / "run", "simclr_digits.yaml", tmp_path / "cache", "model.backbone_kwargs={width: 0.25}")
    local = evaluate_checkpoint(tmp_path / "run", dataset=str(digits_dir), max_samples=200, out_path=tmp_path / "a")
    with serve(digits_dir.parent) as (base, _):
        url = f"{base}/{digits_dir.name}"
        served = evaluate_checkpoint(tmp_path / "run", dataset=url, max_samples=200, out_path=tmp_path / "b")
        assert main(["embed", "--checkpoint", str(tmp_path / "run"), "--data", url, "--out",
                     str(tmp_path / "index.parquet")]) == 0
    assert {k: v for k, v in served.items() if k != "data"} == {k: v for k, v in local.items() if k != "data"}
    assert served["data"] == {**local["data"], "dataset": url}
    assert pq.read_schema(tmp_path / "index.parquet").metadata[b"data"] == url.encode()
