"""MLflow tracking against a real server over HTTP on 127.0.0.1, and against a serverless sqlite store."""

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pretrain.tracking import (
    DeletedRun,
    MLflowTracker,
    NullTracker,
    check_holds_run,
    check_reachable,
    check_tracking_uri,
    default_artifact_location,
    default_tracking_uri,
    end_if_running,
    flatten_params,
    make_tracker,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"method": {"name": "dino", "teacher_temp": 0.04}, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "seed": 7}


def _uuid_experiment(request) -> str:
    return f"{request.node.name}-{time.time_ns()}"


def test_params_metrics_artifact_round_trip_over_http(mlflow_server, request, tmp_path):
    """Nested params, metrics over steps and a file artifact read back exactly from the server."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request), run_name="rt")
    tracker.log_params(CONFIG)
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step)
    artifact = tmp_path / "config.yaml"
    artifact.write_text("seed: 7\n")
    tracker.log_artifact(artifact, "configs")
    tracker.set_tags({"git_sha": "abc123"})
    tracker.finish()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {
        "method.name": "dino",
        "method.teacher_temp": "0.04",
        "optim.lr": "0.001",
        "optim.betas": "[0.9, 0.95]",
        "seed": "7",
    }
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
        (s, 1.0 / (s + 1)) for s in range(5)
    ]
    assert run.data.tags["git_sha"] == "abc123"
    assert run.info.status == "FINISHED" and run.info.run_name == "rt"
    downloaded = client.download_artifacts(tracker.run_id, "configs/config.yaml", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == "seed: 7\n"


def test_metrics_are_buffered_until_flush(mlflow_server, request):
    """A few metrics logged within the flush interval reach the server only at flush()."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    tracker.flush()  # restarts the flush clock, so the next call is well within FLUSH_EVERY_S
    tracker.log_metrics({"loss": 2.0}, step=0)
    client = MlflowClient(mlflow_server)
    assert client.get_metric_history(tracker.run_id, "loss") == []
    tracker.flush()
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [2.0]
    tracker.finish()


def test_many_params_and_metrics_are_batched(mlflow_server, request):
    """250 params (over the 100-per-call limit) and 1200 metrics (over the flush threshold) all arrive."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    tracker.log_params({"p": {str(i): i for i in range(250)}, "long": "x" * 10_000})
    for step in range(1200):
        tracker.log_metrics({"m": float(step)}, step=step)
    tracker.finish()
    client = MlflowClient(mlflow_server)
    params = client.get_run(tracker.run_id).data.params
    assert len(params) == 251 and params["p.249"] == "249"
    assert params["long"] == "x" * MAX_PARAM_VAL_LENGTH
    assert [m.step for m in client.get_metric_history(tracker.run_id, "m")] == list(range(1200))


def test_resume_logs_into_the_same_run(mlflow_server, request):
    """A tracker built with run_id continues the run: RUNNING again, history extended, same params accepted."""
    experiment = _uuid_experiment(request)
    first = MLflowTracker(mlflow_server, experiment=experiment)
    first.log_params(CONFIG)
    first.log_metrics({"loss": 3.0}, step=0)
    first.finish("KILLED")

    resumed = MLflowTracker(mlflow_server, experiment=experiment, run_id=first.run_id)
    client = MlflowClient(mlflow_server)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params(CONFIG)
    resumed.log_metrics({"loss": 2.5}, step=1)
    resumed.finish()
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(0, 3.0), (1, 2.5)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_resume_rejects_a_changed_param(mlflow_server, request):
    """MLflow params are immutable: re-logging a key with another value is a ValueError naming the key."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    tracker.log_params({"optim": {"lr": 0.1}})
    with pytest.raises(ValueError, match="optim.lr"):
        tracker.log_params({"optim": {"lr": 0.2}})
    tracker.finish()


def test_a_resume_with_changed_params_tags_what_it_goes_on_with(mlflow_server, request):
    """Params are immutable: a resumed run whose config was changed keeps them, and tags each changed one
    ``resumed.<param>`` with the value it goes on with (a later resume sets it again); a param new to the run is
    logged."""
    experiment = _uuid_experiment(request)
    first = MLflowTracker(mlflow_server, experiment=experiment)
    first.log_params(CONFIG)
    first.finish()
    resumed = MLflowTracker(mlflow_server, experiment=experiment, run_id=first.run_id)
    assert resumed.changed_since_last_start(CONFIG) == {} and resumed.log_resumed_params(CONFIG) == {}
    changed = {**CONFIG, "optim": {**CONFIG["optim"], "lr": 5e-4}, "job": {"max_steps": 40}}
    assert resumed.changed_since_last_start(changed) == {"optim.lr": "0.0005"}  # (job.max_steps: new to the run)
    assert resumed.log_resumed_params(changed) == {"optim.lr": "0.0005"}
    run = MlflowClient(mlflow_server).get_run(first.run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["job.max_steps"] == "40"
    assert run.data.tags["resumed.optim.lr"] == "0.0005"
    # the next resume with that config: changed since the run began, not since its last start (which went on with it)
    assert resumed.changed_since_last_start(changed) == {}
    lower = {**changed, "optim": {**CONFIG["optim"], "lr": 1e-4}}
    assert resumed.changed_since_last_start(lower) == {"optim.lr": "0.0001"}
    assert resumed.log_resumed_params(lower) == {"optim.lr": "0.0001"}
    assert MlflowClient(mlflow_server).get_run(first.run_id).data.tags["resumed.optim.lr"] == "0.0001"
    # back to the logged value: a change since the last start, and the tag says what the run goes on with
    assert resumed.changed_since_last_start(CONFIG) == {"optim.lr": "0.001"}
    assert resumed.log_resumed_params(CONFIG) == {}
    assert MlflowClient(mlflow_server).get_run(first.run_id).data.tags["resumed.optim.lr"] == "0.001"


def test_resume_unknown_run_id_is_a_value_error(mlflow_server, request):
    """Resuming a run id the server does not know fails with one line naming the id."""
    with pytest.raises(ValueError, match="0123456789abcdef"):
        MLflowTracker(mlflow_server, experiment=_uuid_experiment(request), run_id="0123456789abcdef")


def test_a_server_that_goes_away_costs_no_training_and_no_metric(tmp_path, monkeypatch, capsys):
    """The server stops mid-run: flushing keeps the points and says so once (it had raised out of the training loop,
    after minutes of retries, and left the run RUNNING); ending the run says it could not mark it (it had raised,
    hiding what ended the run). The server back (same store, same port): every kept point arrives, once."""
    from tests.mlflow_fixture import serving
    from tests.util import free_port

    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the tracker sets stays in this test
    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    port = free_port()
    with serving(tmp_path, port) as uri:
        tracker = MLflowTracker(uri, experiment="outage")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.flush()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # MLflow's 7 take four minutes
    capsys.readouterr()
    # the server is asked first, so no request waits out MLflow's retries (the training had stood still for the
    # whole outage and a minute more) ...
    tries, send = [], tracker._client.log_batch
    tracker._client.log_batch = lambda *a, **k: (tries.append(1), send(*a, **k))
    for step in (2, 3):
        tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.flush()
    out = capsys.readouterr().out
    assert out.count(f"Warning: MLflow at {uri} did not take the metrics (") == 1, out
    for _ in range(3):  # ... and the next try is a minute after the last
        tracker.log_metrics({f"m{i}": 0.0 for i in range(600)}, step=4)  # past FLUSH_EVERY_N, and past FLUSH_EVERY_S
        time.sleep(0.8)
    assert tries == [] and len(tracker._buffer) == 2 + 1800
    tracker._client.log_batch = send
    tracker._buffer = tracker._buffer[:2]
    # where the store does not answer, a resume cannot tell which steps it holds: none (every step logged again)
    capsys.readouterr()
    assert tracker.last_logged_step() == -1
    assert capsys.readouterr().out.startswith(f"Warning: could not read MLflow run {tracker.run_id}'s last logged "
                                              "step (")
    assert out.strip().endswith("training goes on, and they are kept and sent again (tried every 60 s)")
    assert "\n" not in out.strip()
    # an artifact the server does not take (a finished run's backbone.pt) is one line, not the end of the training
    (tmp_path / "backbone.pt").write_bytes(b"weights")
    assert tracker.log_artifact(tmp_path / "backbone.pt") is False
    assert capsys.readouterr().out.startswith(f"Warning: MLflow at {uri} did not take artifact backbone.pt (")
    tracker.finish("FAILED")  # no exception
    assert capsys.readouterr().out.startswith(f"Warning: could not mark MLflow run {tracker.run_id} FAILED at {uri} (")
    with serving(tmp_path, port):
        assert tracker.last_logged_step() == 3 and tracker.last_logged_step("other") == -1  # step 1's held, 2-3 kept
        tracker._finished = False  # the same tracker, the server back: what it kept goes out
        tracker.finish("FINISHED")
        assert capsys.readouterr().out.startswith(f"MLflow at {uri} takes the metrics again; the kept ones are "
                                                  "sent\n")  # (then MLflow's own lines: the run's address)
        client = MlflowClient(uri)
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
            (1, 1.0), (2, 2.0), (3, 3.0)]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_points_a_server_had_not_taken_at_the_end_are_kept_in_a_file_and_sent_later(tmp_path, monkeypatch, capsys):
    """A server away when a run ends: its last points had been lost from MLflow (one count in a warning). They are
    kept beside the run; the driver's end (``end_if_running``) sends them once the server answers and removes the
    file; a resume sends a file it finds at its first flush. A damaged line is counted and left out."""
    from mlflow.entities import Metric

    from pretrain.tracking import UNSENT_FILE, save_points
    from tests.mlflow_fixture import serving
    from tests.util import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, kept = free_port(), tmp_path / "run" / UNSENT_FILE
    kept.parent.mkdir()
    with serving(tmp_path, port) as uri:
        tracker = MLflowTracker(uri, experiment="kept", unsent_file=kept)
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.flush()
        assert not kept.exists()
    for step in (2, 3):
        tracker.log_metrics({"loss": float(step), "lr": 0.5}, step=step)
    capsys.readouterr()
    tracker.finish("FINISHED")
    out = capsys.readouterr().out
    assert f"Warning: 4 metric points MLflow had not taken are kept in {kept}; they are sent once its server " in out
    assert len(kept.read_text().splitlines()) == 4
    with serving(tmp_path, port):
        assert end_if_running(uri, tracker.run_id, "FINISHED", kept) is True
        assert "MLflow: the 4 metric points kept at the run's end are sent" in capsys.readouterr().out
        assert not kept.exists()
        client = MlflowClient(uri)
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
            (1, 1.0), (2, 2.0), (3, 3.0)]
        assert [m.step for m in client.get_metric_history(tracker.run_id, "lr")] == [2, 3]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"

        # the same kept file found by a resume (a torchrun job has no driver to send it): sent at its first flush
        save_points(kept, [Metric("loss", 4.0, 0, 4), Metric("loss", 5.0, 0, 5)])
        kept.write_text(kept.read_text() + "{not json\n")
        resumed = MLflowTracker(uri, experiment="kept", run_id=tracker.run_id, unsent_file=kept)
        assert f"Warning: 1 lines of {kept} are not metric points; left out" in capsys.readouterr().out
        assert kept.exists()  # until they are through
        resumed.log_metrics({"loss": 6.0}, step=6)
        resumed.finish("FINISHED")
        assert not kept.exists()
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == [1, 2, 3, 4, 5, 6]


def test_system_metrics_go_on_after_the_server_was_away(tmp_path, monkeypatch):
    """MLflow's sampler stopped for good at the first request its server did not answer: a server restarted mid-run
    ended the run's system metrics. Samples arrive again once it is back, and stop when the run ends."""
    from pretrain.tracking import start_system_metrics
    from tests.mlflow_fixture import serving
    from tests.util import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the outage outlasts any retries: a request fails
    port = free_port()
    with serving(tmp_path, port) as uri:
        tracker = MLflowTracker(uri, experiment="system")
        monitor = start_system_metrics(tracker.run_id, uri, every_s=0.5)
        time.sleep(3)
    away = time.time() * 1000
    time.sleep(3)
    try:
        with serving(tmp_path, port):
            back = time.time() * 1000
            deadline = time.monotonic() + 60
            key = "system/cpu_utilization_percentage"
            while time.monotonic() < deadline:
                samples = MlflowClient(uri).get_metric_history(tracker.run_id, key)
                if any(m.timestamp > back for m in samples):
                    break
                time.sleep(1)
            assert any(m.timestamp < away for m in samples) and any(m.timestamp > back for m in samples)
            tracker.finish()
    finally:
        monitor.finish()


def test_a_resume_into_a_deleted_run_is_refused(mlflow_server, request):
    """A run deleted in MLflow (alone, or with its experiment) takes no metrics: a resume into it is one line saying
    how to restore it (it had passed and failed in the workers)."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    tracker.finish()
    MlflowClient(mlflow_server).delete_run(tracker.run_id)
    with pytest.raises(DeletedRun, match=f"holds MLflow run {tracker.run_id} as deleted, and a deleted run takes no "
                                         f"metrics; restore it \\(`mlflow runs restore --run-id {tracker.run_id}`"):
        check_holds_run(mlflow_server, tracker.run_id)


def test_a_web_server_that_is_not_mlflow_is_refused(tmp_path):
    """A tracking URI at some other web server (its /health a 404) is refused in one line before anything starts (it
    had passed, and the workers failed on an HTML page)."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConnectionError, match=f"^{uri} answers, but is not an MLflow tracking server \\(its "
                                                  "/health: HTTP 404\\)$"):
            check_reachable(uri)
    finally:
        server.shutdown()


def test_a_server_is_asked_whether_it_holds_a_run_to_resume(mlflow_server, request):
    """What `pretrain train --resume` asks before anything starts: the run's id, held by the server, passes; one it
    does not hold (a resume pointed at another server) is one line naming the server and the id."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    tracker.finish()
    check_holds_run(mlflow_server, tracker.run_id)
    with pytest.raises(ValueError) as err:
        check_holds_run(mlflow_server, "0123456789abcdef")
    assert str(err.value).startswith(f"{mlflow_server} holds no MLflow run 0123456789abcdef (")
    assert "\n" not in str(err.value)


def test_experiment_is_reused(mlflow_server, request):
    """Two trackers with one experiment name put two runs into the same experiment."""
    experiment = _uuid_experiment(request)
    a = MLflowTracker(mlflow_server, experiment=experiment)
    b = MLflowTracker(mlflow_server, experiment=experiment)
    client = MlflowClient(mlflow_server)
    assert client.get_run(a.run_id).info.experiment_id == client.get_run(b.run_id).info.experiment_id
    a.finish()
    b.finish()


def test_context_manager_marks_failed_on_exception(mlflow_server, request):
    """An exception inside `with tracker:` ends the run FAILED."""
    tracker = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    with pytest.raises(RuntimeError), tracker:
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FAILED"


def test_a_run_left_running_is_ended_by_the_driver_once(mlflow_server, request, capsys):
    """What the driver does for a run whose workers were stopped (Ctrl-C, SIGTERM, a killed worker): a RUNNING run is
    ended with the status given; one that ended itself keeps its status; an unreachable store is one warning line."""
    running = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    ended = MLflowTracker(mlflow_server, experiment=_uuid_experiment(request))
    ended.finish("FAILED")
    assert end_if_running(mlflow_server, running.run_id, "KILLED") is True
    assert end_if_running(mlflow_server, ended.run_id, "KILLED") is False
    assert end_if_running(mlflow_server, running.run_id, "FAILED") is False
    client = MlflowClient(mlflow_server)
    assert [client.get_run(t.run_id).info.status for t in (running, ended)] == ["KILLED", "FAILED"]
    assert client.get_run(running.run_id).info.end_time is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound but not listening
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert end_if_running(uri, running.run_id, "KILLED") is None
    warning = [line for line in capsys.readouterr().out.splitlines() if "Warning" in line]  # (MLflow's "View run")
    assert len(warning) == 1 and warning[0].startswith(f"Warning: could not mark MLflow run {running.run_id} KILLED")
    with pytest.raises(ValueError, match="status must be one of"):
        end_if_running(mlflow_server, running.run_id, "STOPPED")


def test_rank_one_gets_a_null_tracker_that_writes_nothing(mlflow_server, request, tmp_path):
    """make_tracker on rank 1 returns a NullTracker and creates no experiment on the server."""
    experiment = _uuid_experiment(request)
    tracker = make_tracker(rank=1, tracking_uri=mlflow_server, experiment=experiment)
    assert isinstance(tracker, NullTracker) and not isinstance(tracker, MLflowTracker)
    tracker.log_params(CONFIG)
    tracker.log_metrics({"loss": 1.0}, step=0)
    (tmp_path / "a.txt").write_text("a")
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.set_tags({"a": "b"})
    tracker.finish()
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None


def test_only_a_tracking_rank_loads_mlflow(mlflow_server, request):
    """A process that imports the training loop (DeepSpeed, whose autotuner would import MLflow, included) and gets
    rank 1's tracker never loads MLflow, ~2 s of a worker's start; DeepSpeed's import then gives MLflow back, and the
    same process's rank-0 tracker starts a real run."""
    code = (
        "import sys\n"
        "import pretrain.train\n"
        "from pretrain.tracking import make_tracker\n"
        f"t = make_tracker(rank=1, tracking_uri={mlflow_server!r}, experiment={_uuid_experiment(request)!r})\n"
        "t.log_metrics({'loss': 1.0}, step=1); t.finish()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow loaded'\n"
        f"t = make_tracker(rank=0, tracking_uri={mlflow_server!r}, experiment={_uuid_experiment(request)!r})\n"
        "t.log_metrics({'loss': 1.0}, step=1); t.finish()\n"
        "print(t.run_id)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = MlflowClient(mlflow_server).get_run(proc.stdout.split()[-1])
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 1.0


def test_rank_zero_gets_an_mlflow_tracker(mlflow_server, request):
    """make_tracker on rank 0 starts a real run."""
    tracker = make_tracker(rank=0, tracking_uri=mlflow_server, experiment=_uuid_experiment(request))
    assert isinstance(tracker, MLflowTracker)
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "RUNNING"
    tracker.finish()


def test_default_sqlite_uri_works_without_a_server(tmp_path):
    """The sqlite default keeps the db and the artifacts under out_dir; values read back from the db."""
    out_dir = tmp_path / "run"
    uri = default_tracking_uri(out_dir)
    tracker = MLflowTracker(uri, experiment="local", artifact_location=default_artifact_location(out_dir))
    tracker.log_params(CONFIG)
    tracker.log_metrics({"loss": 0.5}, step=3)
    artifact = tmp_path / "eval.json"
    artifact.write_text("{}")
    tracker.log_artifact(artifact)
    tracker.finish()
    assert (out_dir / "mlflow.db").is_file()
    assert list((out_dir / "mlartifacts").rglob("eval.json"))
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).data.params["optim.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(3, 0.5)]


def test_a_store_killed_while_created_leaves_no_database(tmp_path):
    """A process killed while MLflow creates a new sqlite store's tables (seconds of migrations) leaves no mlflow.db
    (a half-migrated one failed every later run of that directory): the store is built under another name and linked
    into place whole; the next tracker creates it and works. No partial file is left by a creation that finishes."""
    import os
    import signal

    db = tmp_path / "mlflow.db"
    code = ("import sys\nfrom pathlib import Path\nfrom pretrain.tracking import create_sqlite_store\n"
            "create_sqlite_store(Path(sys.argv[1]), sys.argv[2])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), default_artifact_location(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mlflow.db.*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline, "the store was never being built"
        time.sleep(0.005)
    time.sleep(0.2)  # inside the migrations
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not db.exists()
    tracker = MLflowTracker(default_tracking_uri(tmp_path), experiment="local")
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.finish()
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [1.5]
    assert not list(tmp_path.glob(f".mlflow.db.{os.getpid()}.partial"))


def test_sqlite_artifacts_default_to_beside_the_db(tmp_path, monkeypatch):
    """Without artifact_location a sqlite-backed run keeps artifacts in <db dir>/mlartifacts, not in the cwd."""
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    tracker = MLflowTracker(default_tracking_uri(out_dir), experiment="local")
    (tmp_path / "note.txt").write_text("n")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()
    assert list((out_dir / "mlartifacts").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()


_LOG_ONE = """
import sys
from pathlib import Path
from pretrain.tracking import MLflowTracker, default_tracking_uri
out, name, run_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None
tracker = MLflowTracker(default_tracking_uri(out), experiment="local", run_id=run_id)
(out.parent / name).write_text(name)
tracker.log_artifact(out.parent / name)
tracker.finish()
print(tracker.run_id)
"""


def _log_one(out: Path, name: str, run_id: str = "") -> subprocess.CompletedProcess:
    """A process of its own, as each resume is: MLflow caches a run's artifact location per process."""
    proc = subprocess.run([sys.executable, "-c", _LOG_ONE, str(out), name, run_id], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_moved_store_keeps_its_artifacts_beside_it(tmp_path):
    """A run directory's store moved with the runs around it (`mv`): a resume's artifacts go to the mlartifacts/ that
    came along, where the earlier ones are (they went to the old folder, made anew); a copy of the database alone
    still points at the original's."""
    old, new = tmp_path / "runs a", tmp_path / "moved"
    run_id = _log_one(old, "first.txt").stdout.split()[-1]
    (tmp_path / "alone").mkdir()
    shutil.copy(old / "mlflow.db", tmp_path / "alone" / "mlflow.db")
    old.rename(new)
    resumed = _log_one(new, "second.txt", run_id)
    assert f"MLflow store {new / 'mlflow.db'} was moved: its artifacts are now read and written at " \
           f"{default_artifact_location(new)}, not {default_artifact_location(old)}" in resumed.stdout
    assert not old.exists()
    client = MlflowClient(default_tracking_uri(new))
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["first.txt", "second.txt"]
    assert client.get_run(run_id).info.artifact_uri.startswith(default_artifact_location(new) + "/")
    assert client.get_experiment_by_name("local").artifact_location == default_artifact_location(new)
    assert "was moved" not in _log_one(new, "third.txt", run_id).stdout  # once
    new.rename(old)  # the original back: the lone copy of its database was not rewritten
    alone = MlflowClient(default_tracking_uri(tmp_path / "alone"))
    assert "was moved" not in _log_one(tmp_path / "alone", "fourth.txt", run_id).stdout
    assert alone.get_run(run_id).info.artifact_uri.startswith(default_artifact_location(old) + "/")
    assert not (tmp_path / "alone" / "mlartifacts").exists()


def test_flatten_params_accepts_nested_dataclasses():
    """Config dataclasses flatten like dicts; empty dicts and lists stay single values."""

    @dataclasses.dataclass
    class Optim:
        lr: float = 0.1
        betas: tuple = (0.9, 0.95)

    @dataclasses.dataclass
    class Job:
        optim: Optim = dataclasses.field(default_factory=Optim)
        extra: dict = dataclasses.field(default_factory=dict)

    assert flatten_params(Job()) == {"optim.lr": "0.1", "optim.betas": "(0.9, 0.95)", "extra": "{}"}


def test_default_uris_are_absolute(tmp_path, monkeypatch):
    """Relative out_dir resolves against the working directory: sqlite:////abs/mlflow.db and file:///abs/mlartifacts."""
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("out") == f"sqlite:///{tmp_path.resolve()}/out/mlflow.db"
    assert default_artifact_location("out") == f"file://{tmp_path.resolve()}/out/mlartifacts"


def test_a_uri_that_misses_its_scheme_or_names_a_directory_is_told_so(tmp_path):
    """A server's host:port without http:// had been called a file store (or 'localhost' a scheme); a sqlite URI of a
    directory passed every check and failed in the workers ("unable to open database file")."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    for uri, message in (
            ("127.0.0.1:5000", "tracking URI '127.0.0.1:5000' has no scheme: a server's is http://127.0.0.1:5000 (or "
                               "https://)"),
            ("localhost:5000/", "tracking URI 'localhost:5000/' has no scheme: a server's is http://localhost:5000/ "
                                "(or https://)"),
            ("127.0.0.1", "tracking URI '127.0.0.1' has no scheme: a server's is http://127.0.0.1 (or https://)"),
            (f"sqlite:///{tmp_path}", f"tracking URI 'sqlite:///{tmp_path}' names a directory, not a database file: "
                                      f"e.g. sqlite:///{tmp_path}/mlflow.db"),
            ("sqlite:///", "tracking URI 'sqlite:///' names a directory, not a database file: e.g. sqlite:///mlflow.db"),
            # a file that is no database (a manifest, a log) had passed too
            (f"sqlite:///{tmp_path / 'notes.txt'}",
             f"tracking URI 'sqlite:///{tmp_path / 'notes.txt'}' names {tmp_path / 'notes.txt'}, a file that is not an "
             "SQLite database")):
        with pytest.raises(ValueError) as err:
            check_tracking_uri(uri)
        assert str(err.value) == message


@pytest.mark.parametrize(
    "uri", ["", "ftp://example.com", "mlflow.db", "http://", "http://127.0.0.1:notaport", "sqlite://rel.db"]
)
def test_malformed_uri_is_a_value_error(uri):
    """Unsupported schemes, missing host, bad port and a two-slash sqlite URI fail fast with ValueError."""
    with pytest.raises(ValueError, match="tracking URI"):
        check_tracking_uri(uri)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com", "sqlite:////tmp/x.db",
                                 "databricks", "databricks://profile"])
def test_wellformed_uri_passes(uri):
    """Common good URIs are accepted without touching the network."""
    check_tracking_uri(uri)


def test_malformed_uri_fails_on_every_rank():
    """make_tracker checks the URI even on ranks that will not log."""
    with pytest.raises(ValueError, match="unsupported scheme"):
        make_tracker(rank=3, tracking_uri="ftp://x", experiment="e")


def test_unreachable_server_is_a_one_line_connection_error():
    """Nothing listening on the port: ConnectionError naming the server, within a few seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"tracking server http://127.0.0.1:{port} is not reachable"):
            MLflowTracker(f"http://127.0.0.1:{port}", experiment="e")
    assert time.monotonic() - start < 10


def test_a_database_store_is_checked_for_its_driver_and_its_host_before_a_run(tmp_path, capsys):
    """`tracking.uri: postgresql://...` had passed `pretrain train --dry-run` with no driver installed or nothing at
    the address, and failed in every worker: refused in one line, the password hidden; a driver installed (pg8000, a
    dev dependency) and a host that takes the connection pass, as does a socket path (no host)."""
    import importlib.util

    from pretrain.cli import main

    def train(uri: str, name: str) -> int:
        return main(["train", "--dry-run", "--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}",
                     "--set", f"job.run_name={name}", "--set", f"tracking.uri={uri}"])

    assert importlib.util.find_spec("MySQLdb") is None  # mysql://'s default driver: not installed here
    with socket.socket() as closed, socket.socket() as listening:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        shut, open_ = closed.getsockname()[1], listening.getsockname()[1]
        assert train(f"mysql://me:hunter2@127.0.0.1:{open_}/runs", "a") == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: tracking.uri: tracking store mysql://me:***@127.0.0.1:{open_}/runs needs the database "
                       "driver MySQLdb, which is not installed here: pip install 'mysqlclient' (or name an installed "
                       "one, e.g. mysql+DRIVER://)")
        assert train(f"postgresql+pg8000://me:hunter2@127.0.0.1:{shut}/runs", "a") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: tracking.uri: tracking store postgresql+pg8000://me:***@127.0.0.1:{shut}/runs "
                              f"is not reachable: 127.0.0.1:{shut} ") and "hunter2" not in err
        assert train("postgresql+nodriver://127.0.0.1/runs", "a") == 2
        assert "is no database URI SQLAlchemy reads" in capsys.readouterr().err
        assert not (tmp_path / "a").exists()
        assert train(f"postgresql+pg8000://me:hunter2@127.0.0.1:{open_}/runs", "b") == 0
        assert train("postgresql+pg8000://me@/runs?unix_sock=/run/postgresql/.s.PGSQL.5432", "c") == 0


def test_a_resume_behind_the_logged_steps_logs_each_step_once_where_they_come_again_as_they_were(tmp_path, capsys):
    """A run that logged steps 1-8 to MLflow and 1-9 to metrics.csv (MLflow's buffer lost step 9 in the crash),
    resumed from its step-5 checkpoint: where the resume is exact, steps 6-8 go to MLflow no more and 6-9 to
    metrics.csv no more (step 9 to MLflow does); where it is not (another config or number of ranks), every step is
    logged again, beside the earlier values, and one line says so. A resume at the last logged step says nothing."""
    from pretrain.trainer import _History, _replayed

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="replay")
    for step in range(1, 9):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.flush()
    rows = tmp_path / "metrics.csv"
    history = _History(rows, enabled=True)
    row = {"loss": 0.5, "lr": 0.1, "images_per_s": 10.0, "step_time_s": 0.1, "epoch": 0.0}
    for step in range(1, 10):
        history.add(step, row)
    capsys.readouterr()
    assert _replayed(tracker, _History(rows, enabled=True), 9, exact=True) == -1 and capsys.readouterr().out == ""
    assert _replayed(tracker, history, 5, exact=False) == -1
    assert capsys.readouterr().out == ("Steps 6-9, logged before, are trained again otherwise (another config or "
                                       "number of ranks): MLflow and metrics.csv keep both values of each\n")
    assert history.skip_through == -1
    assert _replayed(tracker, history, 5, exact=True) == 8
    assert capsys.readouterr().out == "Steps 6-9, logged before, are trained again as they were: not logged twice\n"
    for step in range(6, 11):
        history.add(step, row)
    assert [int(line.split(",")[0]) for line in rows.read_text().splitlines()[1:]] == list(range(1, 11))
    assert history.last_step() == 10 and _History(rows, enabled=False).last_step() == -1
    tracker.finish()


def test_the_keys_a_resume_may_change_and_train_the_same_steps_are_config_keys():
    """The config keys outside the steps (a resume that changes only them still skips the steps it trains again as
    they were) are keys of the config as the run logs it: a renamed key would otherwise fall out of the set unseen."""
    from pretrain.config import Config, to_dict
    from pretrain.tracking import _as_logged
    from pretrain.trainer import OUTSIDE_THE_STEPS

    assert OUTSIDE_THE_STEPS <= set(_as_logged(to_dict(Config())))
    assert not {k for k in OUTSIDE_THE_STEPS if k.startswith(("optim.", "data.", "model.", "method.", "zero."))}
