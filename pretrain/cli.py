"""``pretrain``: one console script, subcommands ``train``, ``submit`` (slurm, k8s), ``eval``, ``search``, ``embed``,
``attention``, ``extract``, ``export`` and ``data``.

Every check that can fail on user input runs from here (a run's: ``pretrain.preflight``), before Ray or any worker
starts; a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from pretrain.config import Config, ConfigError, config_changes, load_config
from pretrain.preflight import DEFAULT_RECIPE, check_local_gpus, check_writable, prepare_run, resolve_run, run_lock


def _path(text: str) -> Path:
    """A path argument, ``~`` expanded (the shell does not expand it after ``=``, as in ``--out=~/x``)."""
    return Path(text).expanduser()


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too) whose errors are one line, as the commands' own are (argparse's had
    been its whole usage block, a dozen lines, above the one that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain", description="Self-supervised pretraining of visual encoders.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="pretrain an encoder with Ray Train + DeepSpeed, tracked in MLflow, evaluated at the end",
        description="Pretrain with the recipe in --config on a Ray cluster (a private local one unless --address). "
        "The run directory <job.out_dir>/<job.run_name> receives config.yaml, Ray's checkpoints, metrics.csv, "
        "backbone.pt, loss_curve.png, eval.json and eval-map.png.",
    )
    _run_args(t)
    t.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379 or 'auto') instead of starting one")
    t.add_argument("--dry-run", action="store_true",
                   help="validate, build the shards, write the run directory and config, then stop")

    st = sub.add_parser(
        "stop", help="have a training run checkpoint after the step it is on and end there",
        description="Ask the run training in RUN to stop: every rank checkpoints after the step it is on (the ranks "
        "agree on it at every step) and the run ends there, its MLflow run marked KILLED; `pretrain train --resume "
        "RUN` (or the torchrun command again) goes on from that step. A Slurm job asks this of its run at its "
        "time-limit warning, a Kubernetes pod when it is stopped. "
        "A run that is not training drops the request when it next starts.")
    st.add_argument("run", type=_path, help="the run directory")

    sb = sub.add_parser("submit", help="submit training as a cluster job")
    ssub = sb.add_subparsers(dest="scheduler", required=True)
    sl = ssub.add_parser(
        "slurm", help="an sbatch job: a Ray cluster over the job's nodes, then training on it",
        description="Validate the config, write the run directory, render <run_dir>/slurm/job.sbatch (a Ray head on "
        "the first node, a Ray node on each other, then `pretrain train --resume <run_dir> --address <head>`) and "
        "submit it. The job is requeueable: a requeued job continues from the latest checkpoint.")
    _run_args(sl)
    sl.add_argument("--nodes", type=int, default=1, help="Slurm nodes (default 1)")
    sl.add_argument("--gpus-per-node", type=int, default=0,
                    help="GPUs per node; one worker per GPU, so job.num_workers = nodes x this (default 0: CPU)")
    sl.add_argument("--cpus-per-node", type=int, default=8, help="CPUs per node for Ray (default 8)")
    sl.add_argument("--partition")
    sl.add_argument("--time", help="wall-clock limit, e.g. 24:00:00")
    sl.add_argument("--account")
    sl.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="--OPTION=VALUE",
                    help="another sbatch option for the script, e.g. --sbatch-arg=--qos=high (repeatable; not one that "
                         "submit has a flag for or the script sets: nodes, time, log, requeue ...)")
    sl.add_argument("--join-timeout", type=int, default=300, help="seconds to wait for every Ray node (default 300)")
    sl.add_argument("--requeue-grace", type=int, default=300,
                    help="seconds before the time limit at which the run checkpoints after the step it is on "
                         "and stops, and the job requeues itself (default 300; 0: never)")
    sl.add_argument("--wait", action="store_true", help="return when the job ends, with its exit status")
    sl.add_argument("--dry-run", action="store_true", help="write the run directory and the script, do not submit")
    k = ssub.add_parser(
        "k8s", help="a Kubernetes Job: a Ray cluster over its pods, then training on it",
        description="Validate the config, write the run directory (on the --pvc volume, which this host must see at "
        "--mount-path), render <run_dir>/k8s/job.yaml (a headless Service and an Indexed Job of --nodes pods: a Ray "
        "head in pod 0, a Ray node in each other, then `pretrain train --resume <run_dir> --address <head>` in pod 0) "
        "and `kubectl create` it. The Job is complete when pod 0 succeeds (Kubernetes >= 1.33); a failed or "
        "preempted pod is started again and the run continues from its latest checkpoint.")
    _run_args(k)
    k.add_argument("--image", help="container image with ssl-pretrain installed (required)")
    k.add_argument("--pvc", help="ReadWriteMany PersistentVolumeClaim that holds job.out_dir (required)")
    k.add_argument("--mount-path",
                   help="where the pods mount --pvc: the path at which this host sees it too (default: job.out_dir)")
    k.add_argument("--nodes", type=int, default=1, help="pods, one Ray node each (default 1)")
    k.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per pod; one worker per GPU, so job.num_workers = nodes x this (default 0: CPU)")
    k.add_argument("--cpus-per-node", type=int, default=8, help="CPUs each pod requests, all for Ray (default 8)")
    k.add_argument("--memory-per-node", help="memory each pod requests and is limited to, e.g. 64Gi (default: none)")
    k.add_argument("--namespace", help="default: the namespace of kubectl's current context")
    k.add_argument("--service-account", help="the pods' service account")
    k.add_argument("--priority-class", help="the pods' PriorityClass")
    k.add_argument("--http-auth-secret", help="a Secret whose key 'authorization' (e.g. 'Bearer <token>') the pods "
                   "send to a data server that wants one, as PRETRAIN_HTTP_AUTHORIZATION")
    k.add_argument("--ray-port", type=int, default=6379, help="the Ray head's port (default 6379)")
    k.add_argument("--dashboard-port", type=int, default=8265, help="the Ray dashboard's port in pod 0 (default 8265)")
    k.add_argument("--join-timeout", type=int, default=300,
                   help="seconds to wait for the head and every Ray node (default 300)")
    k.add_argument("--restarts", type=int, default=3,
                   help="pod failures the Job tolerates, each start resuming (default 3; preemptions do not count)")
    k.add_argument("--termination-grace", type=int, default=120,
                   help="seconds Kubernetes gives a pod it stops (preemption, deletion): the run checkpoints after "
                   "the step it is on within all but 50 of them, then stops (default 120)")
    k.add_argument("--wait", action="store_true", help="return when the Job ends: 0 if complete, 1 if failed")
    k.add_argument("--dry-run", action="store_true", help="write the run directory and the manifests, do not submit")

    e = sub.add_parser("eval", help="evaluate a pretrained backbone on frozen features",
                       description="kNN, linear probe, 1/5-shot, KMeans NMI/ARI, retrieval, anomaly detection and "
                       "ICA axes of a backbone's frozen features (optionally fine-tuning; zero-shot for CLIP), next to "
                       "the same encoder at random init and raw pixels; writes eval.json (and eval-map.png, the "
                       "features in 2-D) beside the checkpoint.")
    e.add_argument("--checkpoint", type=_path, required=True, help="a run directory or its backbone.pt")
    e.add_argument("--dataset", help="digits, samples, or a labelled shard directory (`pretrain data shards`; labels "
                   "and class names from its manifest) (default: the run's eval.dataset)")
    e.add_argument("--max-samples", type=int,
                   help="evaluate at most this many samples, a seeded draw (stratified for digits) (default: the run's "
                   "eval.max_samples)")
    e.add_argument("--out", type=_path, help="where to write the report (default: eval.json beside the checkpoint)")
    e.add_argument("--finetune-epochs", type=int,
                   help="also fine-tune the backbone (and its random init) this many epochs (default: the run's "
                   "eval.finetune_epochs)")
    e.add_argument("--finetune-layer-decay", type=float,
                   help="fine-tuning a ViT: layer-wise lr decay, e.g. 0.75 (MAE's for ViT-B); goes with "
                   "--finetune-epochs N (default: the run's eval.finetune_layer_decay)")
    e.add_argument("--map", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the test split's features in 2-D (t-SNE) beside the report, <report>-map.png (default: "
                   "the run's eval.embedding_map)")

    q = sub.add_parser("search", help="semantic search: the images of a shard dataset nearest to a text or an image",
                       description="Embed every image of --data with a finished run's encoder (or read them from "
                       "--index) and print the --k nearest to the query: --text (a CLIP run: texts and images share "
                       "one space) or --image KEY (any run; a sample key of the data). --out writes the results as a "
                       "contact sheet (PNG).")
    q.add_argument("--checkpoint", type=_path, required=True, help="a finished run directory")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (CLIP runs)")
    what.add_argument("--image", metavar="KEY", help="the key of an image of --data as the query")
    q.add_argument("--data", help="a shard directory (default: the run's data.source; 'digits' = its digits shards); "
                   "with --index, where the indexed data is now (the contact sheet reads its images; default: the "
                   "directory the index recorded at embed time)")
    q.add_argument("--index", type=_path, help="an embedding index of the data written by `pretrain embed` with this "
                   "checkpoint (nothing is embedded again)")
    q.add_argument("--k", type=int, default=10, help="results to show (default 10)")
    q.add_argument("--out", type=_path, help="write the query's results as a PNG contact sheet")

    a = sub.add_parser("attention", help="a ViT run's self-attention maps for some images (DINO's), as a PNG",
                       description="Where the cls token of a finished ViT run looks: for each --image KEY of --data, "
                       "the attention of the cls token over the patches in one block (the last by default), per head "
                       "and averaged, drawn beside the image as the encoder saw it; printed: how the cls token shares "
                       "its attention between itself, the register tokens (model.backbone_kwargs.num_registers) and "
                       "the patches.")
    a.add_argument("--checkpoint", type=_path, required=True, help="a finished run directory with a ViT backbone")
    a.add_argument("--image", metavar="KEY", action="append", required=True,
                   help="the key of an image of --data (repeatable: a row each)")
    a.add_argument("--data", help="a shard directory (default: the run's data.source; 'digits' = its digits shards)")
    a.add_argument("--block", type=int, default=-1, help="which block's attention (default -1: the last)")
    a.add_argument("--out", type=_path, required=True, help="the PNG to write")

    m = sub.add_parser("embed", help="embed every image of a shard dataset into a Parquet index",
                       description="Embed every image of --data with a finished run's encoder (whole images, resized "
                       "and normalised as in training; undecodable ones skipped and counted) and write a Parquet file: "
                       "key, label, caption, path (its file, where the manifest has it), digest (of its bytes) and "
                       "embedding per image, the checkpoint's sha256 and the data directory in its metadata. `pretrain "
                       "search --index` queries it without embedding again.")
    m.add_argument("--checkpoint", type=_path, required=True, help="a finished run directory")
    m.add_argument("--data", help="a shard directory (default: the run's data.source)")
    m.add_argument("--out", type=_path, required=True, help="the Parquet file to write (must not exist)")
    m.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")

    w = sub.add_parser("extract", help="a run's encoder at a checkpointed step, as a finished run leaves it",
                       description="Merge a training checkpoint's ZeRO partitions (offline, on the CPU, from any "
                       "number of ranks) and write the encoder as a finished run does (config.yaml, backbone.pt, and "
                       "model.pt for CLIP / a VQ-VAE) into <run>/steps/step_XXXXXXX, which `pretrain eval`, `embed`, "
                       "`search`, `export` and pretrain.load_encoder take as a run directory. Works while the run "
                       "trains and after it stopped.")
    w.add_argument("--checkpoint", type=_path, required=True, help="the run directory")
    w.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    w.add_argument("--out", type=_path, help="the directory to write (default <run>/steps/step_XXXXXXX)")
    w.add_argument("--list", action="store_true", help="only list the run's checkpoints")

    x = sub.add_parser("export", help="write a run's encoder as a torch.export program for serving",
                       description="Trace a finished run's encoder, preprocessing included, with torch.export for one "
                       "input layout ((B, C, H, W) images of one dtype; any batch size) and save it as a .pt2 file "
                       "that plain torch loads without ssl-pretrain: torch.export.load(FILE).module()(images) gives "
                       "(B, F) features, without an autograd graph. The program is checked against the eager encoder "
                       "before it is written.")
    x.add_argument("--checkpoint", type=_path, required=True, help="a finished run directory")
    x.add_argument("--out", type=_path, required=True, help="the .pt2 file to write (must not exist)")
    x.add_argument("--input-size", type=int, nargs="+", metavar="N", help="the images' side, or height and width "
                   "(default: the run's data.image_size; other sizes are resized inside the program)")
    x.add_argument("--input-channels", type=int, help="1 (grey) or 3 (RGB) (default: the run's data.channels)")
    x.add_argument("--input-dtype", default="uint8", help="uint8 (0..255) or float32 (0..1: the program cannot check "
                   "the range, and 0..255 floats or normalised images give features of nothing) (default uint8)")
    x.add_argument("--device", default="cpu", help="the device the program runs on, fixed in it: cpu, auto (a GPU if "
                   "there is one), cuda, cuda:1, ... (default cpu)")
    for cmd in (q, m, a):
        cmd.add_argument("--device", default="auto", help="where the encoder runs: auto (a GPU if there is one), cpu, "
                       "cuda, cuda:1, ... (default auto)")

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shards", help="write WebDataset tar shards + a Parquet manifest + checksums",
                        description="Write WebDataset shards from a source: 'digits' (scikit-learn, with captions), "
                        "'samples' (colour crops of scikit-learn's two sample photos), 'folder:PATH' (an "
                        "ImageFolder-style tree of JPEG/PNG/WebP/BMP/TIFF, class = sub-folder), 'images:PATH' "
                        "(every image under PATH, unlabelled; captions from <stem>.txt files beside the images) or "
                        "'table:FILE' (a CSV/TSV/Parquet/JSON-lines table: image path, optional caption and label).")
    s.add_argument("--source", required=True,
                   help="digits | samples | folder:PATH (a sub-folder per class) | images:PATH (unlabelled, any depth) "
                   "| table:FILE (columns image, caption, label)")
    s.add_argument("--out", type=_path, required=True, help="the dataset directory to write (new, or empty)")
    s.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    s.add_argument("--workers", type=int, default=4,
                   help="shards written at a time (threads reading the images; default 4; the output is the same)")
    s.add_argument("--dedup", action="store_true",
                   help="leave out exact duplicates (images with the bytes of an earlier one), the first kept; every "
                   "image is read once more, first")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = dsub.add_parser("index", help="make WebDataset shards written by another tool a dataset, in place",
                        description="Write manifest.parquet and checksums.json beside the *.tar files of DIR (written "
                        "by img2dataset, webdataset's TarWriter, ...: <key>.jpg|png|webp|bmp|tiff, optional <key>.txt "
                        "caption and <key>.cls label, else unlabelled), so runs, eval and search read them as they "
                        "are. The tars are not changed.")
    i.add_argument("dir", type=_path, help="the directory of .tar shards")
    i.add_argument("--workers", type=int, default=4, help="tars read at a time (default 4)")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = dsub.add_parser("verify", help="check a shard dataset before a run reads it",
                        description="Check that every shard of DIR's manifest is there with the sha256 of "
                        "checksums.json, reads to its end and holds its samples, each with an image and a label; "
                        "with --decode that every image decodes. Prints each problem and a summary; exit status 1 "
                        "when there is any.")
    v.add_argument("dir", help="the dataset directory (manifest.parquet, checksums.json, shards); a URL is refused: "
                   "verify the directory its server serves")
    v.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    v.add_argument("--workers", type=int, default=4, help="shards checked at a time (default 4)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    """What says which run: a recipe plus overrides, or a run directory to continue."""
    p.add_argument("--config", type=_path, help=f"YAML recipe (default: {DEFAULT_RECIPE.name})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", type=_path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint, with its config (plus --set overrides)")
    p.add_argument("--from-step", type=int, metavar="N",
                   help="with --resume: go on from RUN_DIR's checkpoint of step N instead, as a new run "
                   "(<RUN_DIR>-from-N, or --set job.run_name=NAME) in an MLflow run of its own; RUN_DIR is left as it "
                   "is (a damaged latest checkpoint; a run to take back to before it diverged)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<job.out_dir>/mlflow.db)")


def _resolve_run(args, extra: list[str] = ()) -> tuple[Config, Path]:
    """``resolve_run`` of the run options (``_run_args``), plus ``extra`` overrides."""
    # the flag's value as given: a YAML string (unquoted, a '#' had begun a comment and 'file:' a mapping)
    overrides = [*args.overrides, *extra] + ([f"tracking.uri={json.dumps(args.tracking_uri)}"] if args.tracking_uri
                                             else [])
    return resolve_run(args.config, overrides, args.resume, args.from_step)


def _continues(args) -> bool:
    """A resume in place: a run directory already written, not a new one (a new run, or a branch of --from-step)."""
    return bool(args.resume) and args.from_step is None


def _prepare(args, cfg, run_dir: Path, *, extra: list[str] = (), reach_tracking: bool = False) -> None:
    """``prepare_run`` of the run options; a branch (--from-step) then gets its checkpoint and rows, or is removed
    again where that fails (it is new: ``run_lock`` found it empty)."""
    write = not _continues(args) or bool(args.overrides or extra)
    before = load_config(run_dir / "config.yaml") if _continues(args) and write else None
    prepare_run(cfg, run_dir, write=write, reach_tracking=reach_tracking)
    if before is not None and (changed := config_changes(before, cfg)):
        print(f"{run_dir / 'config.yaml'}: written with {changed} (the run goes on with them)", flush=True)
    if args.from_step is not None:
        import shutil

        from pretrain.preflight import branch_run

        try:
            branch_run(args.resume.resolve(), args.from_step, run_dir)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise


def cmd_train(args) -> int:
    cfg, run_dir = _resolve_run(args)
    if not (args.dry_run or args.address):
        check_local_gpus(cfg)
    if args.address and not args.dry_run:  # before the run directory is written: a retry must not find it taken
        from cluster.ray_launcher import check_address

        try:
            check_address(args.address)
        except ConnectionError as e:
            raise ConfigError(str(e)) from None
    with run_lock(run_dir, new=not _continues(args)):
        _prepare(args, cfg, run_dir, reach_tracking=True)
        if args.dry_run:
            return 0
        return _train(cfg, run_dir, args.address)


def _train(cfg, run_dir: Path, address: str | None) -> int:
    from pretrain.engine import prebuild_ops

    prebuild_ops()
    from cluster.ray_launcher import Interrupted, TrainingFailed, run_ray

    try:
        result = run_ray(cfg, run_dir, address=address, on_stop=lambda signum: _end_run(cfg, run_dir, "KILLED"))
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        _end_run(cfg, run_dir, "KILLED")
        print(f"Stopped by {name}{_way_on(run_dir)}", file=sys.stderr)
        return 128 + e.signum
    except TrainingFailed as e:
        _end_run(cfg, run_dir, "FAILED")
        print(f"error: {e}{_way_on(run_dir, latest=False)}", file=sys.stderr)
        return 1
    if result.error is not None:
        _end_run(cfg, run_dir, "FAILED")
        print(f"error: training failed: {result.error}{_way_on(run_dir, latest=False)}", file=sys.stderr)
        return 1
    from pretrain.steps import STOPPED_EXIT, stopped_at

    step = stopped_at(run_dir)
    if step is not None:
        _end_run(cfg, run_dir, "KILLED")  # its points a server had not taken, sent
        print(f"Stopped at step {step} as asked, checkpointed; resume with --resume {run_dir}", flush=True)
        return STOPPED_EXIT
    _end_run(cfg, run_dir, "FINISHED")  # the workers' end, where the server was away then and is back now
    print(f"Done: {run_dir}", flush=True)
    if (run_dir / "eval.json").is_file():
        print(f"Evaluation report: {run_dir / 'eval.json'}", flush=True)
    return 0


def _end_run(cfg, run_dir: Path, status: str) -> None:
    """The run's MLflow run ended ``status`` where its workers were stopped before ending it (Ctrl-C, a killed worker):
    it would show RUNNING for ever."""
    from pretrain.tracking import UNSENT_FILE, default_tracking_uri, end_if_running
    from pretrain.trainer import RUN_ID_FILE

    if (run_dir / RUN_ID_FILE).is_file():
        uri = cfg.tracking.uri or default_tracking_uri(run_dir.parent)
        if end_if_running(uri, (run_dir / RUN_ID_FILE).read_text().strip(), status, run_dir / UNSENT_FILE):
            print(f"MLflow: run marked {status}", flush=True)


def _way_on(run_dir: Path, latest: bool = True) -> str:
    """How a run that ended before its end goes on (with its latest checkpoint where ``latest``), as the end of a
    sentence: a resume, or where it was stopped before Ray recorded its first checkpoint (a resume would be refused),
    a branch from one on disk."""
    from pretrain.steps import check_ray_record, list_checkpoints, unrecorded_way_on

    try:
        check_ray_record(run_dir)
    except ValueError:
        return f"; Ray had not recorded its checkpoints: {unrecorded_way_on(run_dir)}"
    if not latest:
        return f"; resume with --resume {run_dir}"
    steps = list_checkpoints(run_dir)
    where = f"; its latest checkpoint is step {max(steps)}" if steps else "; it has no checkpoint yet"
    return f"{where}; resume with --resume {run_dir}"


def cmd_stop(args) -> int:
    import fcntl

    from pretrain.preflight import RUN_LOCK
    from pretrain.steps import STOP_FILE

    run_dir = args.run
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} " + ("is not a run directory (no config.yaml)" if run_dir.exists()
                                          else "does not exist"))
    with (run_dir / RUN_LOCK).open("a+") as f:  # who trains it: the command holding its lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = None
            fcntl.flock(f, fcntl.LOCK_UN)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
    (run_dir / STOP_FILE).write_text("")
    print(f"Asked {run_dir} to stop: it checkpoints after the step it is on and ends there; "
          f"`pretrain train --resume {run_dir}` goes on from that step. " + (
              f"It is trained by {holder}." if holder else "No `pretrain train` holds it now (a torchrun run holds "
              "none); a run that is not training drops the request when it next starts."), flush=True)
    return 0


def cmd_submit(args) -> int:
    if args.dry_run and args.wait:  # (it had been taken silently)
        raise ConfigError("--wait: a --dry-run submits nothing to wait for; give one or the other")
    return {"slurm": _submit_slurm, "k8s": _submit_k8s}[args.scheduler](args)


def _write_submitted_run(args, job, check) -> Path:
    """What every scheduler shares: the job's worker count into the config, the checks (``check(cfg, run_dir)``, the
    scheduler's own), then the run directory written. Nothing is written if a check fails."""
    extra = [f"job.num_workers={job.num_workers}", "job.use_gpu=true"] if job.num_workers else []
    cfg, run_dir = _resolve_run(args, extra)
    job.check_workers(cfg.job.num_workers, use_gpu=cfg.job.use_gpu, overrides=args.overrides)
    from urllib.parse import urlsplit

    host = urlsplit(cfg.tracking.uri).hostname if cfg.tracking.uri.startswith(("http://", "https://")) else None
    if host is not None and (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise ConfigError(f"tracking.uri: {cfg.tracking.uri} is this host's own loopback address, which each of the "
                          "job's nodes would take for its own; give the server's address on the network they share")
    check(cfg, run_dir)
    with run_lock(run_dir, new=not _continues(args)):
        _prepare(args, cfg, run_dir, extra=extra)
    return run_dir


def _submit_slurm(args) -> int:
    from cluster.slurm import SlurmJob, check_run_dir, find_sbatch, submit, write_sbatch

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                   partition=args.partition, time=args.time, account=args.account, sbatch_args=args.sbatch_args,
                   join_timeout=args.join_timeout, requeue_grace=args.requeue_grace)
    if not args.dry_run:
        find_sbatch()  # before anything is written
    run_dir = _write_submitted_run(args, job, lambda cfg, run_dir: check_run_dir(run_dir))
    script = write_sbatch(job, run_dir)
    print(f"Slurm script: {script}", flush=True)
    if args.dry_run:
        return 0
    job_id, status = submit(script, wait=args.wait)
    if args.wait:
        log = run_dir / "slurm" / f"{job_id}.out"
        print(f"Slurm job {job_id} ended with status {status}; its log: {log}", flush=True)
        return 0 if status == 0 else 1
    return status


def _submit_k8s(args) -> int:
    from cluster.k8s import K8sJob, check_shared, find_kubectl, submit, write_manifests
    from data_pipeline.remote import AUTH_ENV, is_url
    from data_pipeline.shards import BUILTIN_VERSIONS

    job = K8sJob(image=args.image, pvc=args.pvc, mount_path=args.mount_path, nodes=args.nodes,
                 gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                 memory_per_node=args.memory_per_node, namespace=args.namespace, service_account=args.service_account,
                 priority_class=args.priority_class, http_auth_secret=args.http_auth_secret, ray_port=args.ray_port,
                 dashboard_port=args.dashboard_port, join_timeout=args.join_timeout, restarts=args.restarts,
                 termination_grace=args.termination_grace)
    if not args.dry_run:
        find_kubectl()  # before anything is written

    def shared(cfg: Config, run_dir: Path) -> None:
        """What the pods open must be on the PVC: the run (and the default MLflow store beside it), the shard
        directories (training data, evaluation data), BEiT's tokenizer run and a sqlite tracking store. Built-in
        sources are built in each pod on first use; datasets served over HTTP(S) are read from there."""
        datasets = {"data.source": cfg.data.source,
                    "eval.dataset": cfg.eval.dataset if cfg.eval.reads_dataset else None,
                    "method.tokenizer": cfg.method.tokenizer}  # BEiT's: a run directory the pods load
        paths = {k: v for k, v in datasets.items() if v is not None and v not in BUILTIN_VERSIONS and not is_url(v)}
        served = next((k for k, v in datasets.items() if v is not None and is_url(v)), None)
        if served and os.environ.get(AUTH_ENV) and not job.http_auth_secret:
            raise ConfigError(f"{served}: its server takes the {AUTH_ENV} set here, which the pods would not have; "
                              "put it in a Secret (kubectl create secret generic NAME --from-literal="
                              f"authorization=\"${AUTH_ENV}\") and pass --http-auth-secret NAME")
        if cfg.tracking.uri.startswith("sqlite:///"):
            paths["tracking.uri"] = cfg.tracking.uri.removeprefix("sqlite:///")
        check_shared(job, run_dir, paths)

    run_dir = _write_submitted_run(args, job, shared)
    manifest = write_manifests(job, run_dir)
    print(f"Kubernetes manifests: {manifest}", flush=True)
    if args.dry_run:
        return 0
    return submit(manifest, wait=args.wait)


def _stdout_may_close(command):
    """``command``, where a reader that stops early (`| head -1`) only loses the rest of the output: the command goes on
    to write its files and ends with status 0 (a broken pipe had ended `eval` with status 1 and no report)."""
    import contextlib
    import functools
    import io

    class Output(io.TextIOBase):
        def __init__(self, stream):
            self.stream, self.closed_by_reader = stream, False

        def write(self, text: str) -> int:
            if not self.closed_by_reader:
                try:
                    self.stream.write(text)
                except BrokenPipeError:
                    self._reader_gone()
            return len(text)

        def flush(self) -> None:
            if not self.closed_by_reader:
                try:
                    self.stream.flush()
                except BrokenPipeError:
                    self._reader_gone()

        def fileno(self) -> int:  # what asks the terminal (a progress bar's width) asks the stream
            return self.stream.fileno()

        def isatty(self) -> bool:
            return not self.closed_by_reader and self.stream.isatty()

        def _reader_gone(self) -> None:
            self.closed_by_reader = True
            try:  # what the stream still buffers goes nowhere at exit, instead of failing there
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError, io.UnsupportedOperation):
                pass

    @functools.wraps(command)
    def run(args) -> int:
        with contextlib.redirect_stdout(Output(sys.stdout)):
            return command(args)

    return run


@_stdout_may_close
def cmd_eval(args) -> int:
    from pretrain.evaluate import evaluate_checkpoint

    _new_file(args.out, "eval", "a JSON report", ".json")
    evaluate_checkpoint(args.checkpoint, dataset=args.dataset, out_path=args.out,
                        finetune_epochs=args.finetune_epochs, max_samples=args.max_samples,
                        finetune_layer_decay=args.finetune_layer_decay, embedding_map=args.map)
    return 0


@_stdout_may_close
def cmd_search(args) -> int:
    import numpy as np
    import pyarrow.compute as pc

    from pretrain.index import embed_shards, load_run, rank

    if args.k < 1:
        raise ConfigError(f"--k: must be >= 1, got {args.k}")
    _new_file(args.out, "search", "a PNG contact sheet", ".png")
    if args.text is not None and not args.text.strip():
        raise ConfigError("--text: empty; give the words to search for")
    run = load_run(args.checkpoint, _device(args.device))
    if args.text is not None and run.encode_text is None:
        raise ConfigError(f"--text: {args.checkpoint} is a {run.cfg.method.name} run, which has no text tower "
                          "(a clip run has); query with --image KEY instead")
    if args.text is not None and len(args.text.encode()) > (most := run.cfg.method.context_length - 2):
        read = args.text.encode()[:most].decode(errors="ignore")
        print(f"Warning: --text is {len(args.text.encode())} bytes and the text tower reads the first {most} "
              f"(method.context_length {most + 2}, as in training): it searches for {read!r}", flush=True)
    if args.index is not None:
        from data_pipeline.shards import list_shards
        from pretrain.index import checkpoint_digest, load_gallery, weights_digest

        gallery, meta = load_gallery(args.index)
        if not gallery.keys:
            raise ConfigError(f"--index: {args.index} holds no embeddings; write it again with `pretrain embed`")
        if "values_sha256" in meta:
            same = meta["values_sha256"] == weights_digest(args.checkpoint)
        elif "weights_sha256" in meta:  # an index of an earlier version: the digest it kept
            same = meta["weights_sha256"] == weights_digest(args.checkpoint, legacy=True)
        else:  # older still: its files' digest
            same = meta["checkpoint_sha256"] == checkpoint_digest(args.checkpoint)
        if not same:
            raise ConfigError(f"--index: {args.index} was embedded with other weights ({meta['checkpoint']}); "
                              f"write it again with `pretrain embed --checkpoint {args.checkpoint}`")
        # only the contact sheet reads images: from --data (the data moved since), else where the index says it was
        shards, moved = [], None
        if args.data is not None:
            shards = _data_shards(run, args.data)
            _check_index_data(gallery, args.index, meta, shards)
        elif args.out is not None:
            try:
                shards = list_shards(meta["data"])
            except ValueError:  # moved or gone since: the ranking still prints, the sheet is refused after it
                moved = (f"--out: the contact sheet reads the images from {meta['data']}, the data directory "
                         f"{args.index} recorded at embed time, which holds no shard dataset now; give where the "
                         "data is now with --data DIR")
    else:
        shards = _data_shards(run, args.data)
        if args.image is not None:  # before every image is embedded (a typo had cost a pass over the data)
            from data_pipeline.shards import dataset_dir, read_manifest

            keys = read_manifest(dataset_dir(shards[0]), columns=["key"]).column("key")
            if not pc.any(pc.equal(keys, args.image)).as_py():
                raise ConfigError(f"--image: no sample with key {args.image!r} in {dataset_dir(shards[0])}")
        gallery = embed_shards(run, shards)
    if args.text is not None:
        import torch

        with torch.no_grad():
            query = run.encode_text([args.text])[0].float().cpu().numpy()
        title = f"text {args.text!r}"
    else:
        if args.image not in gallery.keys:
            raise ConfigError(f"--image: no decodable sample with key {args.image!r} in the data")
        query = gallery.embeddings[gallery.keys.index(args.image)]
        title = f"image {args.image!r}"
    hits = rank(gallery, np.asarray(query), args.k)
    print(f"{len(hits)} nearest of {len(gallery.keys)} images to {title}"
          + (f" ({gallery.corrupt} undecodable skipped)" if gallery.corrupt else "") + ":")
    paths = gallery.paths or [None] * len(gallery.keys)
    shown = any(paths[r] for r, _ in hits)  # the files the images were written from, where the manifest has them
    columns = {"class": [gallery.class_name(row) for row, _ in hits], "key": [gallery.keys[row] for row, _ in hits]}
    if shown:
        columns["file"] = [paths[row] or "-" for row, _ in hits]
    widths = {name: max(len(name), *map(len, cells)) for name, cells in columns.items()}
    print(f"{'rank':>4}  {'similarity':>10}  " + "".join(f"{name:<{w}}  " for name, w in widths.items()) + "caption")
    for i, (row, sim) in enumerate(hits):
        cells = "".join(f"{columns[name][i]:<{w}}  " for name, w in widths.items())
        print(f"{i + 1:>4}  {sim:>10.4f}  {cells}{gallery.captions[row] or ''}".rstrip())
    if args.out is not None:
        from data_pipeline.shards import dataset_dir
        from pretrain.plots import SHEET_MAX, contact_sheet

        if args.index is not None and moved:
            raise ConfigError(moved)
        drawn = hits[:SHEET_MAX]
        if len(hits) > SHEET_MAX:
            print(f"Note: the contact sheet draws the first {SHEET_MAX} of the {len(hits)} results (the table above "
                  "lists them all)")
        digests = [gallery.digests[r] for r, _ in drawn] if gallery.digests else None
        try:  # similarities as the table prints them
            contact_sheet(shards, [gallery.keys[r] for r, _ in drawn], [f"{s:.4f}" for _, s in drawn], title,
                          args.out, digests=digests)
        except ValueError as e:
            if args.index is None:
                raise
            raise ConfigError(f"--out: {e}: the data at {dataset_dir(shards[0])} changed since {args.index} was "
                              "embedded; embed it again with `pretrain embed`") from None
        print(f"Contact sheet: {args.out}")
    return 0


def _check_index_data(gallery, index: Path, meta: dict, shards: list[str]) -> None:
    """ConfigError (one line) where the data of ``shards`` (``--data`` beside ``--index``: where the indexed data is
    now) lacks images the index holds, by key and, where both keep them, by digest: other data (a wrong --data had
    been taken without a word, and with --out called "changed since" the index was embedded)."""
    from data_pipeline.shards import dataset_dir, read_manifest

    where = dataset_dir(shards[0])
    table = read_manifest(where)
    digests = table.column("digest").to_pylist() if "digest" in table.column_names else None
    held = dict(zip(table.column("key").to_pylist(), digests or [None] * table.num_rows))
    mine = gallery.digests or [None] * len(gallery.keys)
    absent = [k for k, d in zip(gallery.keys, mine) if k not in held or (d and held[k] and d != held[k])]
    if absent:
        raise ConfigError(f"--data: {where} is not the data {index} was embedded from: {len(absent)} of its "
                          f"{len(gallery.keys)} images are not in it (by key and bytes), e.g. {absent[0]!r}; give the "
                          f"directory that data is in now ({meta.get('data', '?')} at embed time), or embed this one")


@_stdout_may_close
def cmd_attention(args) -> int:
    from pretrain.attention import attention_maps, plot_attention
    from pretrain.index import load_run

    _new_file(args.out, "attention", "a PNG", ".png")
    run = load_run(args.checkpoint, _device(args.device))
    result = attention_maps(run, _data_shards(run, args.data), args.image, block=args.block)
    print(f"cls-token attention of the {result.maps.shape[1]} heads of block {result.block} "
          f"(mean over heads; {run.backbone.num_registers} register tokens):")
    width = max(5, *map(len, result.classes))  # the class's name where the dataset has names, as search shows it
    print(f"{'key':<16} {'class':>{width}} {'self':>6} {'registers':>9} {'patches':>7}  most attended patch (row, col)")
    for key, name, shares, maps in zip(result.keys, result.classes, result.shares.tolist(), result.maps):
        mean = maps.mean(0)
        row, col = divmod(int(mean.argmax()), mean.shape[1])
        print(f"{key:<16} {name:>{width}} {shares[0]:>6.3f} {shares[1]:>9.3f} {shares[2]:>7.3f}"
              f"  ({row}, {col}): {float(mean.max()):.3f}")
    note = None
    if run.backbone.global_pool == "mean" and result.block == len(run.backbone.blocks) - 1:
        note = ("this ViT pools the mean of its patch tokens (global_pool: mean), so no loss reads the cls token of "
                "its last block: the maps of that block are untrained; --block -2 shows the last block whose cls "
                "token the patches read")
        print(f"Note: {note}")
    print(f"Attention maps: {plot_attention(result, args.out, note=note)}")
    return 0


def _new_file(path: Path | None, command: str, kind: str, *suffixes: str) -> None:
    """Refuse, in one line, an ``--out`` of ``command`` that exists (nothing written is overwritten) or whose name
    says another format than the ``kind`` it writes (a report.csv that holds Parquet)."""
    if path is None:
        return
    if path.exists():
        raise ConfigError(f"--out: {path} already exists; {command} overwrites nothing")
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"--out: {command} writes {kind}; give it a name ending in {' or '.join(suffixes)}, got "
                          f"{path.name!r}")
    check_writable(path, "--out")


def _device(spec: str) -> str:
    """``--device``, checked: auto, cpu, cuda or cuda:N of a GPU this machine has."""
    import torch

    if spec in ("auto", "cpu"):
        return spec
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise ConfigError(f"--device: {spec!r} is not a device (auto, cpu, cuda, cuda:N)")
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device: {spec} is not on this machine ({torch.cuda.device_count()} GPUs)")
    return spec


def _data_shards(run, data: str | None) -> list[str]:
    """The shards of ``--data`` (a built-in source or a shard directory), else of the run's own ``data.source``."""
    import dataclasses

    from pretrain.data import resolve_shards

    if data is None:
        return resolve_shards(run.cfg.data)
    if not data:
        raise ConfigError("--data: must not be empty (a shard directory, digits or samples)")
    try:
        return resolve_shards(dataclasses.replace(run.cfg.data, source=data))
    except ConfigError as e:  # what is wrong with --data, said of --data
        raise ConfigError(str(e).replace("data.source", "--data")) from None


@_stdout_may_close
def cmd_embed(args) -> int:
    from data_pipeline.shards import dataset_dir
    from pretrain.index import embed_shards, load_run, save_gallery

    _new_file(args.out, "embed", "a Parquet file", ".parquet", ".pq")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    run = load_run(args.checkpoint, _device(args.device))
    shards = _data_shards(run, args.data)
    gallery = embed_shards(run, shards, batch_size=args.batch_size)
    save_gallery(gallery, args.out, checkpoint=args.checkpoint, data_dir=dataset_dir(shards[0]))
    print(f"Embedded {len(gallery.keys)} images of {args.data or run.cfg.data.source}"
          + (f" ({gallery.corrupt} undecodable skipped)" if gallery.corrupt else "")
          + f", {gallery.embeddings.shape[1]} dimensions each: {args.out}", flush=True)
    return 0


def cmd_extract(args) -> int:
    from pretrain.steps import check_run_dir, extract_step, list_checkpoints

    if args.list:
        if given := next((o for o, v in (("--step", args.step), ("--out", args.out)) if v is not None), None):
            raise ConfigError(f"{given}: --list only lists the run's checkpoints; give it without {given}")
        found = list_checkpoints(check_run_dir(args.checkpoint))
        for step, path in sorted(found.items()):
            print(f"step {step:>9}  {path}")
        if not found:
            print(f"{args.checkpoint}: no checkpoint", flush=True)
        return 0
    if args.out is not None:
        check_writable(args.out, "--out")
    step, out = extract_step(args.checkpoint, args.step, args.out)
    print(f"Wrote the encoder of step {step} of {args.checkpoint} to {out}; evaluate it with `pretrain eval "
          f"--checkpoint {out}`", flush=True)
    return 0


@_stdout_may_close
def cmd_export(args) -> int:
    from pretrain.export import export_encoder

    _new_file(args.out, "export", "a torch.export program", ".pt2")
    size = args.input_size
    if size is not None and len(size) not in (1, 2):
        raise ConfigError(f"--input-size: one side or height and width, got {len(size)} numbers")
    info = export_encoder(args.checkpoint, args.out, input_size=None if size is None else (size[0], size[-1]),
                          input_channels=args.input_channels, input_dtype=args.input_dtype,
                          device=_device(args.device))
    shape = "x".join(str(d) for d in info["input"]["shape"])
    print(f"Exported the {info['method']} encoder ({info['backbone']}) of {args.checkpoint}: {shape} "
          f"{info['input']['dtype']} images -> {info['features']} features, on {info['device']}; matches the encoder "
          f"to {info['max_abs_diff']:.1e}: {args.out}", flush=True)
    return 0


def _print_problems(problems: list[str], shown: int = 20) -> None:
    for line in problems[:shown]:
        print(f"problem: {line}", flush=True)
    if len(problems) > shown:
        print(f"problem: ... and {len(problems) - shown} more", flush=True)


def cmd_data(args) -> int:
    from data_pipeline import remote
    from data_pipeline.shards import index_shards, verify_dataset, write_shards

    def count(n: int, word: str) -> str:  # "1 shard", "2 shards"; "1 class", "2 classes"
        return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"

    if args.data_command == "verify":
        if args.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
        # verify_dataset refuses a URL, a missing folder and one without a manifest in one line each (a Path had made
        # http://host/x the local http:/host/x)
        args.dir = args.dir if remote.is_url(args.dir) else _path(args.dir)
        counts, problems = verify_dataset(args.dir, decode=args.decode, workers=args.workers,
                                          progress=not args.no_progress)
        _print_problems(problems)
        decoded = f", {counts['undecodable']} undecodable" if args.decode else ""
        print(f"Verified {args.dir}: {count(counts['shards'], 'shard')}, {counts['read']} of "
              f"{count(counts['samples'], 'sample')} read{decoded}: "
              + (f"{len(problems)} problem(s)" if problems else "intact"), flush=True)
        return 1 if problems else 0

    if args.data_command == "index":
        manifest, n = index_shards(args.dir, workers=args.workers, progress=not args.no_progress)
        others = n["tars"] - n["shards"]
        print(f"Indexed {count(n['samples'], 'sample')} ({n['captions']} with captions) in "
              f"{count(n['shards'], 'shard')}: {manifest}"
              + (f"; {others} other .tar file(s) hold no sample of it" if others else "")
              + (f"; {n['compressed']} compressed tar(s) not read" if n["compressed"] else "")
              + (f"; left out {n['skipped']} without an image, with one training does not decode, or with a bad "
                 "label/caption" if n["skipped"] else "")
              + (f"; {n['damaged']} shard(s) damaged, indexed up to the damage (`pretrain data verify` reports them "
                 "until they are written again)" if n["damaged"] else "")
              + (f"; {n['duplicates']} sample(s) repeat an earlier one's image exactly (the same bytes)"
                 if n["duplicates"] else ""), flush=True)
        _print_problems(n["problems"])
        if n["repeated_keys"]:
            key, first, other = n["repeated_keys"][0]
            print(f"Warning: {len(n['repeated_keys'])} sample(s) have the key of an earlier sample, e.g. {key!r} in "
                  f"{first} and again in {other}: training reads them all; evaluation, search, embed and attention "
                  "take the first sample of a key", flush=True)
        return 0

    if args.shard_size <= 0:
        raise ConfigError(f"--shard-size: must be > 0, got {args.shard_size}")
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    check_writable(args.out, "--out")
    if args.out.is_dir() and any(args.out.iterdir()):
        raise ConfigError(f"--out: {args.out} already holds files; a dataset is written into a new (or empty) "
                          "directory, over nothing")
    manifest = write_shards(args.source, args.out, shard_size=args.shard_size, progress=not args.no_progress,
                            workers=args.workers, dedup=args.dedup)
    from data_pipeline.shards import read_manifest

    table = read_manifest(manifest.parent, columns=["shard", "digest"])
    meta = table.schema.metadata or {}
    classes = json.loads(meta.get(b"classes", b"[]"))
    print(f"Wrote {count(table.num_rows, 'image')} ({count(len(classes), 'class') if classes else 'unlabelled'}) in "
          f"{count(len(set(table.column('shard').to_pylist())), 'shard')}: {manifest}", flush=True)
    repeats = table.num_rows - len(set(table.column("digest").to_pylist()))
    if repeats:  # (of the images written: before the lines of what was left out)
        print(f"Of them {repeats} repeat an earlier image exactly (the same bytes); --dedup writes each image once",
              flush=True)
    for note in json.loads(meta.get(b"left_out", b"[]")):
        print(f"Left out: {note}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``pretrain`` command. ``argv`` None: this process's own command line, and the process ends with the
    command (``end_process``); a list: a call from Python code (tests, a notebook), which returns the exit status."""
    code = _run(argv)
    if argv is None:
        end_process(code)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt: what a command cleans up on Ctrl-C
    (a half-written dataset's temp folder, a lock) it cleans up on SIGTERM too."""


def _terminated(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked child (a loader worker) that inherited the handler: end as SIGTERM ends
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated


_MAIN_PID = os.getpid()


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "stop": cmd_stop, "submit": cmd_submit, "eval": cmd_eval, "search": cmd_search,
               "embed": cmd_embed, "attention": cmd_attention, "extract": cmd_extract, "export": cmd_export,
               "data": cmd_data}[args.command]
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        return _handle(handler, args)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _handle(handler, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _handle(handler, args) -> int:
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # user input; programming errors keep their traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's: a full or read-only disk, a permission, a server gone; one line too
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what the command had written is complete (written whole)
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"Stopped by {signum.name} ({args.command})", file=sys.stderr)
        return 128 + signum


def end_process(code: int) -> NoReturn:
    """Exit with ``code`` as the interpreter would (other threads joined, atexit handlers run: MLflow's, Ray's,
    logging's, multiprocessing's; output flushed) but without its teardown, whose garbage collections walk every object
    torch, DeepSpeed and MLflow made: 3-4 s of CPU after the work is done, per process, on a 2-core AMD EPYC. Our
    files are closed where they are written. (multiprocessing ends its children the same way.)"""
    import atexit
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
