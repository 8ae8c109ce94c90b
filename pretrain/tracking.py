"""Experiment tracking: an MLflow logger for rank 0 and a null logger for every other rank.

This is the only module that imports MLflow, and only once a run is tracked: the other ranks never load it (~2 s of
a worker's start on a 2-core VM). It talks to MLflow through ``MlflowClient`` (no fluent ``mlflow.start_run`` global
state), so several trackers can live in one process and a run can be resumed by id after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

FLUSH_EVERY_S = 2.0
"""Buffered metrics are sent at the first ``log_metrics`` call this long after the last send ..."""
FLUSH_EVERY_N = 500
"""... or as soon as this many are buffered."""
HEALTH_TIMEOUT_S = 3.0
RETRY_EVERY_S = 60.0
"""While the server does not take the metrics, they are sent again this long after the last try (and before each
checkpoint)."""
HTTP_RETRIES = 3
"""MLflow's retries of a request to a server (its default: 7, over about four minutes), where the environment does
not set MLFLOW_HTTP_REQUEST_MAX_RETRIES: about 15 s; metrics not taken are kept and sent again anyway."""
MAX_KEPT = 1_000_000
"""Metric points kept while the server does not take them (a few hundred MB at most); older ones are dropped."""
UNSENT_FILE = "mlflow_unsent.jsonl"
"""Beside a run: the metric points its server had not taken when the run ended, one JSON object a line; sent (and the
file removed) by the driver once the server answers, or by the run's next resume."""

_SCHEMES = {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks"}
_END_STATUSES = {"FINISHED", "FAILED", "KILLED"}


def default_tracking_uri(out_dir: str | Path) -> str:
    """``sqlite:///<abs out_dir>/mlflow.db``: a serverless store beside the run's outputs."""
    return "sqlite:///" + str(Path(out_dir).resolve() / "mlflow.db")


def default_artifact_location(out_dir: str | Path) -> str:
    """``file:///<abs out_dir>/mlartifacts``: where a sqlite-backed experiment keeps its artifacts."""
    return (Path(out_dir).resolve() / "mlartifacts").as_uri()


def check_tracking_uri(uri: str) -> None:
    """ValueError (one line) when ``uri`` is not a tracking URI MLflow can use; no network access."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"tracking URI must be a non-empty string, got {uri!r}")
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?|(localhost|\d+\.\d+\.\d+\.\d+)/?", uri.strip()):  # urlparse takes the
        # host for a scheme, or a path
        raise ValueError(f"tracking URI {uri!r} has no scheme: a server's is http://{uri.strip()} (or https://)")
    if uri.strip() == "databricks":  # MLflow's own word for the workspace of the configured profile, no '://'
        return  # (it had been called a file store, while the scheme message lists databricks)
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if scheme == "file" or (not parsed.scheme and uri.strip()):
        raise ValueError(f"tracking URI {uri!r} is a file store, which MLflow 3 keeps in maintenance mode and refuses "
                         "runs on; use sqlite:////<dir>/mlflow.db (on a shared disk for a cluster)")
    if scheme not in _SCHEMES:
        raise ValueError(
            f"tracking URI {uri!r} has unsupported scheme {parsed.scheme!r}; use one of {', '.join(sorted(_SCHEMES))}"
        )
    if scheme in ("http", "https") and not parsed.hostname:
        raise ValueError(f"tracking URI {uri!r} has no host (expected e.g. http://127.0.0.1:5000)")
    if scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
        except ValueError as err:
            raise ValueError(f"tracking URI {uri!r} has a bad port: {err}") from None
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {uri!r} must look like sqlite:///relative.db or sqlite:////abs/path.db")
    path = uri[len("sqlite:///"):]
    if scheme == "sqlite" and (not path or Path(path).is_dir()):
        raise ValueError(f"tracking URI {uri!r} names a directory, not a database file: e.g. "
                         f"sqlite:///{path.rstrip('/') + '/' if path else ''}mlflow.db")
    if scheme == "sqlite" and _not_sqlite(Path(path)):  # (it had passed every check and failed in the workers)
        raise ValueError(f"tracking URI {uri!r} names {path}, a file that is not an SQLite database")


def _not_sqlite(path: Path) -> bool:
    """Whether ``path`` is a non-empty file that does not begin as an SQLite database does (its 16-byte header)."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:  # none yet (MLflow makes it), or unreadable here: the store's own error then
        return False
    return bool(head) and head != b"SQLite format 3\x00"


def flatten_params(params, prefix: str = "") -> dict[str, str]:
    """Nested mappings (or dataclasses) as dotted keys with ``str()`` values: ``{"optim": {"lr": 0.1}}`` ->
    ``{"optim.lr": "0.1"}``."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _as_logged(params) -> dict[str, str]:
    """``params`` flattened as MLflow holds them: dotted keys, ``str()`` values truncated to its limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flatten_params(params).items()}


class _RunContext:
    """``with tracker:`` ends the run FINISHED, or FAILED when the body raises."""

    def finish(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


class NullTracker(_RunContext):
    """Accepts every call of :class:`MLflowTracker` and does nothing (ranks other than 0, tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict) -> None:
        pass

    def log_resumed_params(self, params) -> dict[str, str]:
        return {}

    def changed_since_last_start(self, params) -> dict[str, str]:
        return {}

    def last_logged_step(self, key: str = "loss") -> int:
        return -1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def create_sqlite_store(db: Path, artifact_location: str) -> None:
    """A new MLflow sqlite store at ``db``, all at once: MLflow creates its tables over seconds of migrations, and a
    process killed among them (a failing run's other rank takes the tracking rank down) would leave a database of a
    half schema that every later run in that directory fails to open. Built beside it under another name, it takes
    its place by a hard link, which fails where another process put one first (that one is then used). An existing
    ``db`` is left as it is."""
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    partial = db.with_name(f".{db.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        uri = f"sqlite:///{partial}"
        SqlAlchemyStore(uri, artifact_location)
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)  # MLflow keeps an engine per URI
        if engine is not None:
            engine.dispose()
        try:
            os.link(partial, db)
        except FileExistsError:
            pass
    finally:
        partial.unlink(missing_ok=True)


_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def follow_moved_store(db: Path) -> None:
    """Point a moved sqlite store's artifact locations at the ``mlartifacts/`` beside it again.

    MLflow records them absolute (``file:///<old dir>/mlartifacts/...``): a store moved with the runs around it (``mv
    runs /data/runs``) kept logging into the old folder, made anew if gone, and showed none of the moved artifacts.
    Only locations of the default form, ``mlartifacts/`` beside a database, are rewritten, and only where that folder
    came along (or the old one is gone): a copy of the database alone keeps pointing at the original's artifacts.
    """
    import sqlite3

    here = default_artifact_location(db.parent)
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        try:
            rows = con.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.DatabaseError:  # not an MLflow store (yet): MLflow's own error names it
            return
        moved = set()
        for (location,) in rows:
            parsed = urlparse(location or "")
            head, _, _ = parsed.path.partition("/mlartifacts")
            old = f"file://{head}/mlartifacts"
            if parsed.scheme != "file" or old == here or not (location == old or location.startswith(old + "/")):
                continue
            if (db.parent / "mlartifacts").exists() or not Path(unquote(head), "mlartifacts").exists():
                moved.add(old)
        if not moved:
            return
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        with con:
            for old in moved:
                for table, column in _ARTIFACT_COLUMNS:
                    if table in tables:
                        con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                    f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                                    (here, len(old) + 1, old, _like_prefix(old + "/")))
    for old in sorted(moved):
        print(f"MLflow store {db} was moved: its artifacts are now read and written at {here}, not {old}", flush=True)


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching what starts with ``text`` (its own % and _ escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class MLflowTracker(_RunContext):
    """One MLflow run: a new one in ``experiment``, or the existing ``run_id`` resumed (status back to RUNNING).

    A missing experiment is created with ``artifact_location`` (for a sqlite URI it defaults to ``mlartifacts/`` beside
    the database file); an existing one keeps its own. An http(s) URI is health-checked first, so an unreachable
    server is a one-line ConnectionError instead of minutes of retries.

    Metrics are buffered and sent with ``log_batch`` every ``FLUSH_EVERY_S`` seconds or ``FLUSH_EVERY_N`` metrics, so a
    training step costs no HTTP round trip. Used as a context manager, the run ends FAILED if the body raises.
    """

    run_id: str

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
        unsent_file: str | Path | None = None,
    ):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        check_tracking_uri(tracking_uri)
        if not experiment:
            raise ValueError("experiment name must be non-empty")
        scheme = urlparse(tracking_uri).scheme
        if scheme in ("http", "https"):
            check_reachable(tracking_uri)  # MlflowClient would retry for minutes before failing
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
        elif scheme == "sqlite":
            db = Path(tracking_uri[len("sqlite:///") :]).resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            # MLflow's default would be ./mlruns under whatever the working directory is; keep artifacts by the db
            artifact_location = artifact_location or default_artifact_location(db.parent)
            create_sqlite_store(db, artifact_location)
            follow_moved_store(db)
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri)
        self._buffer: list = []
        self._failing = False
        self._finished = False
        self._unsent = Path(unsent_file) if unsent_file is not None else None
        self._unsent_read = False  # the buffer holds that file's points: it goes once they are through
        if run_id is None:
            experiment_id = self._experiment_id(experiment, artifact_location)
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            try:
                self._client.get_run(run_id)
            except MlflowException as err:
                raise ValueError(f"cannot resume MLflow run {run_id!r} at {tracking_uri}: {err.message}") from None
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            if self._unsent is not None and self._unsent.is_file():  # the last end's: sent first, at the first flush
                self._buffer, self._unsent_read = load_points(self._unsent), True
        self._last_flush = time.monotonic()

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        """Id of experiment ``name``, created (with ``artifact_location``) if missing, restored if deleted."""
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another process may have created it between the lookup and the create
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
            print(f"MLflow: experiment {name!r} had been deleted; restored it for this run", flush=True)
        return exp.experiment_id

    def log_params(self, params) -> None:
        """Log ``params`` (a dict or config dataclass; nested dicts flattened to dotted keys; values ``str()``'d,
        truncated to MLflow's limit).

        On a resumed run, params already logged with the same value are skipped; a changed value is a ValueError,
        because MLflow params are immutable.
        """
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        flat = _as_logged(params)
        existing = self._client.get_run(self.run_id).data.params
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
        if changed:
            k = changed[0]
            raise ValueError(f"param {k!r} is already {existing[k]!r} in run {self.run_id}, cannot log {flat[k]!r}")
        todo = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=todo[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_resumed_params(self, params) -> dict[str, str]:
        """On a resumed run whose config was changed (``--resume --set optim.lr=...``): the params whose value differs
        from the one logged become tags ``resumed.<param>`` with the value the run goes on with (params are immutable;
        a later resume sets them again, also back to the logged value), params not logged before are logged. Returns
        the changed ones."""
        flat = _as_logged(params)
        data = self._client.get_run(self.run_id).data
        existing, tags = data.params, data.tags
        changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
        self.log_params({k: v for k, v in flat.items() if k not in existing})
        retag = {f"resumed.{k}": v for k, v in flat.items() if k in changed or tags.get(f"resumed.{k}", v) != v}
        if retag:
            self.set_tags(retag)
        return changed

    def changed_since_last_start(self, params) -> dict[str, str]:
        """The flattened ``params`` whose value differs from the one the run's last start went on with (its logged
        param, or the ``resumed.<param>`` tag a resume with another value set). Call before :meth:`log_resumed_params`,
        which sets those tags."""
        data = self._client.get_run(self.run_id).data
        last = {**data.params, **{k[len("resumed."):]: v for k, v in data.tags.items() if k.startswith("resumed.")}}
        flat = _as_logged(params)
        return {k: v for k, v in flat.items() if k in last and last[k] != v}

    def last_logged_step(self, key: str = "loss") -> int:
        """The last step at which the run holds ``key``, on its store or kept to be sent (-1: none; -1 too where the
        store does not answer, said in one line)."""
        try:
            self._check_up()
            held = self._client.get_metric_history(self.run_id, key)
        except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP stack's many types
            print(f"Warning: could not read MLflow run {self.run_id}'s last logged step ({_short(err)})", flush=True)
            return -1
        return max([m.step for m in held] + [m.step for m in self._buffer if m.key == key], default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step`` (values may be floats or 0-d tensors); sent in batches."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items())
        since = time.monotonic() - self._last_flush
        if self._failing:  # each try may wait out MLflow's retries: not at every step
            if since >= RETRY_EVERY_S:
                self.flush()
        elif len(self._buffer) >= FLUSH_EVERY_N or since >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Send all buffered metrics now. Where the server does not take them (down, restarting, unreachable after
        MLflow's own retries) training goes on: the points are kept (up to MAX_KEPT) and sent again at the next flush,
        with one line when that starts and one when they are through."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        if not self._buffer:
            return
        buffer, self._buffer = self._buffer, []
        sent = 0
        try:
            self._check_up()
            while sent < len(buffer):
                self._client.log_batch(self.run_id, metrics=buffer[sent : sent + MAX_METRICS_PER_BATCH])
                sent += MAX_METRICS_PER_BATCH
        except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP stack's many types: tracking is no reason
            self._buffer = (buffer[sent:] + self._buffer)[-MAX_KEPT:]  # to lose a training
            if not self._failing:
                print(f"Warning: MLflow at {self.tracking_uri} did not take the metrics ({_short(err)}); training "
                      f"goes on, and they are kept and sent again (tried every {RETRY_EVERY_S:.0f} s)", flush=True)
            self._failing = True
            return
        finally:
            self._last_flush = time.monotonic()  # after the try: the next one is a whole interval later
        if self._failing:
            print(f"MLflow at {self.tracking_uri} takes the metrics again; the kept ones are sent", flush=True)
        self._failing = False
        if self._unsent_read:  # what it held is through
            self._unsent.unlink(missing_ok=True)
            self._unsent_read = False

    def _check_up(self) -> None:
        """ConnectionError where an http(s) server does not answer its /health now: MLflow's own requests to a server
        that went away retry for minutes (its default), a training's minutes; asked first, it answers at once."""
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            check_reachable(self.tracking_uri)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a file (or a folder's contents) under ``artifact_path`` of the run's artifacts. Where the store does
        not take it (a server gone) one line says so and where the file stays, and training goes on (a finished run
        had failed at its end, its evaluation and loss curve not made): False."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"artifact {path} does not exist")
        try:
            self._check_up()
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP stack's many types
            print(f"Warning: MLflow at {self.tracking_uri} did not take artifact {path.name} ({_short(err)}); it is "
                  f"kept at {path}", flush=True)
            return False
        return True

    def set_tags(self, tags: dict) -> None:
        """Set run tags (values ``str()``'d, truncated to MLflow's limit)."""
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        items = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and end the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        _check_status(status)
        if self._finished:
            return
        self._finished = True
        self.flush()
        try:  # a server gone must not hide what ended the run (the error being raised) or fail a finished one
            self._check_up()
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP stack's many types
            print(f"Warning: could not mark MLflow run {self.run_id} {status} at {self.tracking_uri} ({_short(err)})",
                  flush=True)
        if not self._buffer:
            return
        if self._unsent is None:
            print(f"Warning: {len(self._buffer)} metric points were not sent to MLflow run {self.run_id}", flush=True)
            return
        save_points(self._unsent, self._buffer)
        print(f"Warning: {len(self._buffer)} metric points MLflow had not taken are kept in {self._unsent}; they are "
              "sent once its server answers (by the Ray job's driver at its end, or by a resume of the run)",
              flush=True)


def _check_status(status: str) -> None:
    if status not in _END_STATUSES:
        raise ValueError(f"status must be one of {sorted(_END_STATUSES)}, got {status!r}")


def _short(err: BaseException) -> str:
    """An exception in one short line (MLflow's and urllib3's run to pages of retries)."""
    text = str(getattr(err, "message", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def check_reachable(uri: str) -> None:
    """ConnectionError (one line) unless an MLflow server answers at ``uri``: its /health answers, with any status but
    404 (an auth proxy's 401 is an answer, MlflowClient reports it; a 404 is some other web server)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise ConnectionError(f"{uri} answers, but is not an MLflow tracking server (its /health: HTTP 404)") \
                from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"tracking server {uri} is not reachable ({reason})") from None


_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
"""The database stores' default ports, where a URI names none."""
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                    "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql", "pg8000": "pg8000",
                    "asyncpg": "asyncpg", "mysql": "mysql-connector-python"}
"""The pip package of a DB-API module SQLAlchemy imports for a database URI."""


def check_database(uri: str) -> None:
    """ConnectionError (one line, the password hidden) unless the database store at ``uri`` (postgresql, mysql,
    mssql, as MLflow gives it to SQLAlchemy) can be used from here: its driver is installed (SQLAlchemy's default for
    the scheme, e.g. psycopg for postgresql://, or the one named, postgresql+pg8000://) and its host accepts a TCP
    connection on its port within HEALTH_TIMEOUT_S. A socket path (no host) is not tried."""
    import socket

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise ConnectionError(f"tracking store {uri.split('@')[-1]!r} is no database URI SQLAlchemy reads "
                              f"({str(err).splitlines()[0]})") from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = (err.name or "").split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        raise ConnectionError(f"tracking store {shown} needs the database driver {module}, which is not installed "
                              f"here: pip install '{package}' (or name an installed one, e.g. "
                              f"{url.get_backend_name()}+DRIVER://)") from None
    if not url.host:
        return
    port = url.port or _DATABASE_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((url.host, port), timeout=HEALTH_TIMEOUT_S).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConnectionError(f"tracking store {shown} is not reachable: {url.host}:{port} {reason}") from None


class DeletedRun(ValueError):
    """The store holds the run, deleted (alone, or with its experiment)."""


def check_holds_run(uri: str, run_id: str):
    """ValueError (one line) unless the store at ``uri`` holds MLflow run ``run_id`` (a resumed run's; a resume pointed
    at another store would fail in every worker), DeletedRun where it holds it deleted. Checked for a sqlite file (not
    created where it is missing) and a reachable server (the run returned); other stores are left to the workers
    (None returned)."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite" and not Path(uri[len("sqlite:///"):]).is_file():
        raise ValueError(f"{uri} does not exist, so it holds no MLflow run {run_id}")
    if scheme not in ("sqlite", "http", "https"):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"{uri} holds no MLflow run {run_id} ({err.message.splitlines()[0]})") from None
    if run.info.lifecycle_stage == "deleted":  # deleted with its experiment, or alone: it takes no more metrics
        raise DeletedRun(f"{uri} holds MLflow run {run_id} as deleted, and a deleted run takes no metrics; restore it "
                         f"(`mlflow runs restore --run-id {run_id}`, its experiment first if that was deleted) to "
                         "resume")
    return run


def save_points(path: Path, points: list) -> None:
    """Metric points (MLflow ``Metric``s) into ``path``, one JSON object a line, replacing it whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for m in points:
            f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
    tmp.replace(path)  # a job killed while writing leaves the last whole file


def load_points(path: Path) -> list:
    """The metric points :func:`save_points` wrote to ``path``; a line that is not one (the file edited) is left out,
    with one warning line counting them."""
    from mlflow.entities import Metric

    points, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
            points.append(Metric(str(d["key"]), float(d["value"]), int(d["timestamp"]), int(d["step"])))
        except (ValueError, TypeError, KeyError):
            bad += 1
    if bad:
        print(f"Warning: {bad} lines of {path} are not metric points; left out", flush=True)
    return points


def end_if_running(uri: str, run_id: str, status: str, unsent_file: str | Path | None = None) -> bool | None:
    """End MLflow run ``run_id`` at ``uri`` with ``status`` if it is still RUNNING (its workers were stopped before
    they could end it): True if it did, False if the run had ended, None where the store cannot be reached (said in
    one line). The metric points in ``unsent_file`` (those the run's server had not taken at its end) are sent first,
    and the file removed."""
    _check_status(status)
    from mlflow import MlflowClient
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    try:
        if urlparse(uri).scheme in ("http", "https"):
            check_reachable(uri)  # MlflowClient would retry for minutes
        client = MlflowClient(uri)
        if unsent_file is not None and Path(unsent_file).is_file():
            points = load_points(Path(unsent_file))
            for i in range(0, len(points), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=points[i : i + MAX_METRICS_PER_BATCH])
            Path(unsent_file).unlink()
            print(f"MLflow: the {len(points)} metric points kept at the run's end are sent", flush=True)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status=status)
        return True
    except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP stack's many types
        print(f"Warning: could not mark MLflow run {run_id} {status} at {uri} ({_short(err)})", flush=True)
        return None


def make_tracker(
    *,
    rank: int,
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
    unsent_file: str | Path | None = None,
) -> NullTracker | MLflowTracker:
    """An :class:`MLflowTracker` on rank 0, a :class:`NullTracker` elsewhere (the URI is still checked everywhere)."""
    check_tracking_uri(tracking_uri)
    if rank != 0:
        return NullTracker()
    return MLflowTracker(tracking_uri, experiment=experiment, run_name=run_name, run_id=run_id,
                         artifact_location=artifact_location, unsent_file=unsent_file)


def start_system_metrics(run_id: str, tracking_uri: str, *, every_s: float, node: str | None = None):
    """MLflow's system-metrics sampler (a thread) for this machine into run ``run_id``, names ``system/<node>/...``
    (``system/...`` without ``node``); call ``.finish()`` on what it returns when training ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        """MLflow's sampler, which stops for good at the first request its server does not answer (a restart of the
        server ended the run's system metrics): this one samples on, and ends with the run or at ``finish``."""

        def monitor(self) -> None:
            from mlflow import MlflowClient

            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                try:
                    if urlparse(tracking_uri).scheme in ("http", "https"):
                        check_reachable(tracking_uri)  # a server gone: at once, not after MLflow's retries
                    if MlflowClient(tracking_uri).get_run(self._run_id).info.status != "RUNNING":
                        return  # ended (by another process: a driver that marked it KILLED)
                    self.publish_metrics(self.aggregate_metrics())
                except Exception:  # noqa: BLE001 - the server's and MLflow's many types: the next sample tries again
                    for monitor in self.monitors:
                        monitor.clear_metrics()  # (a sample is an aggregate of the interval: not kept)

    monitor = Monitor(run_id, sampling_interval=every_s, node_id=node, tracking_uri=tracking_uri,
                      resume_logging=True)  # a resumed run's samples go on after the earlier ones
    monitor.start()
    return monitor
