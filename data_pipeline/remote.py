"""Shard datasets served over HTTP(S): ``data.source: https://host/datasets/photos`` instead of a directory.

The URL is a dataset directory as ``pretrain data shards`` writes it, served by any web server or object store with an
HTTP endpoint (nginx, MinIO, a public bucket): ``<url>/manifest.parquet`` and the shards beside it. Every rank and
loader worker streams its shards straight from there, so the nodes of a Slurm or Kubernetes job need no shared
file system for the data. ``PRETRAIN_HTTP_AUTHORIZATION`` (the value of an ``Authorization`` header, e.g. ``Bearer
<token>``), when set, goes with every request; the launchers pass it on to their workers.

Opening a file is retried on connection errors and 5xx answers (``RETRIES``, exponential back-off); a stream that
breaks later is a truncated shard, counted and skipped like a truncated local file.
"""

from __future__ import annotations

import functools
import http.client
import os
import time
import urllib.error
import urllib.request
from typing import BinaryIO

AUTH_ENV = "PRETRAIN_HTTP_AUTHORIZATION"
RETRIES = 4
"""Attempts to open a file (the first one included)."""
TIMEOUT_S = 60.0
"""Seconds a connection, or one read of it, may stall before it fails."""


def is_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(("http://", "https://"))


def join(base: str, name: str) -> str:
    """The URL of file ``name`` of the dataset at URL ``base``; a ValueError in one line where ``base`` has a query
    string or fragment, which would end up before the file's name (``/data?x=1/manifest.parquet``). Such a URL is
    refused rather than joined after its path: a presigned URL's query signs one object, so no one query serves the
    manifest and every shard; credentials go in ``AUTH_ENV``'s header instead."""
    if "?" in base or "#" in base:
        raise ValueError(f"{base}: a dataset URL with a query string or fragment ('?...', '#...') is not read: the "
                         f"files are fetched as <url>/{name} and <url>/<shard>, which one query (a presigned URL signs "
                         f"one object) cannot serve; give the directory's URL without it, and any credentials as the "
                         f"Authorization header in {AUTH_ENV}")
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The dataset URL of a shard URL."""
    return url.rsplit("/", 1)[0]


def open_url(url: str, *, retries: int = RETRIES, backoff_s: float = 0.5) -> BinaryIO:
    """A readable binary stream of ``url``; OSError naming the URL when it cannot be opened (4xx at once, connection
    errors and 5xx after ``retries`` attempts)."""
    request = urllib.request.Request(url)
    if auth := os.environ.get(AUTH_ENV):
        request.add_header("Authorization", auth)
    for attempt in range(retries):
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only, checked by callers
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries - 1:
                raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries - 1:
                reason = getattr(e, "reason", e)
                raise OSError(f"{url}: {reason}") from None
        time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def open_stream(location: str) -> BinaryIO:
    """A shard (or any file) for reading: a local path or an http(s) URL."""
    return open_url(location) if is_url(location) else open(location, "rb")


@functools.lru_cache(maxsize=8)
def fetch(url: str) -> bytes:
    """The whole body of ``url`` (small files: manifests, checksums), cached per process: a served dataset is written
    once and never changed in place."""
    try:
        with open_url(url) as f:
            return f.read()
    except http.client.HTTPException as e:  # a connection that broke off (IncompleteRead, ...)
        raise OSError(f"{url}: {type(e).__name__}") from None
