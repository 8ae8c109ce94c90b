"""Config schema: recipes, overrides, and one-line errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config, to_dict
from tests.util import config_error

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "simclr_digits.yaml"


def test_recipe_loads_with_types():
    """The demo recipe parses into typed sections, pairs as tuples."""
    cfg = load_config(RECIPE)
    assert cfg.method.name == "simclr" and cfg.data.channels == 1
    assert cfg.data.aug.translate == (0.1, 0.1)
    assert isinstance(cfg.optim.lr, float)


def test_override_parses_yaml_values():
    """--set values are YAML: numbers, booleans and lists."""
    cfg = load_config(RECIPE, ["optim.lr=1e-3", "job.progress=false", "data.aug.crop_scale=[0.3, 1.0]"])
    assert cfg.optim.lr == 1e-3 and cfg.job.progress is False and cfg.data.aug.crop_scale == (0.3, 1.0)


def test_yaml_booleans_fill_word_fields():
    """`job.use_gpu=true` (a YAML bool) means the word: 'true'; an unknown word still names the key."""
    assert load_config(RECIPE, ["job.use_gpu=true"]).job.use_gpu == "true"
    assert load_config(RECIPE, ["job.use_gpu=false"]).job.use_gpu == "false"
    with pytest.raises(ConfigError, match="job.use_gpu: must be auto, true or false"):
        load_config(RECIPE, ["job.use_gpu=sometimes"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "optim.lrr: unknown key"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("zero.stage=4", "zero.stage: must be 0, 1, 2 or 3"),
        ("zero.offload=nvme", "zero.offload: must be none or cpu, got 'nvme'"),
        ("data.aug.flip_prob=1.5", "data.aug.flip_prob: must be in [0, 1]"),
        ("data.aug.crop_scale=[0.5]", "data.aug.crop_scale: expected 2 values"),
        ("method.name=nope", "method.name: unknown method 'nope'"),
        ("model.backbone=vgg", "model.backbone: unknown backbone 'vgg'"),
        ("job.num_workers=0", "job.num_workers: must be >= 1"),
        ("data.dali_threads=0", "data.dali_threads: must be >= 1"),
        ("job.max_steps=10", "optim.warmup_steps: must be < job.max_steps, got 50 and 10; for a short run lower it too "
                             "(--set optim.warmup_steps=N)"),
        ("data.batch_size=true", "data.batch_size: expected an integer"),
        ("eval.knn_every=-5", "eval.knn_every: must be >= 0 (0 = off), got -5"),
        ("optim.lr_scaling=quadratic", "optim.lr_scaling: must be none, linear or sqrt, got 'quadratic'"),
        ("optim.base_batch_size=0", "optim.base_batch_size: must be >= 1, got 0"),
        ("optim.accum_steps=0", "optim.accum_steps: must be >= 1, got 0"),
        ("optim.layer_decay=0", "optim.layer_decay: must be in (0, 1], got 0"),
        ("optim.layer_decay=0.9", "optim.layer_decay: 0.9 needs a ViT backbone"),  # the recipe's is a ConvNet
        ("optim.patch_embed_lr_mult=0.2", "optim.patch_embed_lr_mult: 0.2 needs a ViT backbone"),
        ("optim.patch_embed_lr_mult=0", "optim.patch_embed_lr_mult: must be > 0, got 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    """Each bad value raises ConfigError whose one line starts with the dotted key."""
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override])
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_offload_needs_zero_partitions():
    """zero.offload cpu moves the optimizer's ZeRO partitions: refused at stage 0, taken at 1-3."""
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["zero.stage=0", "zero.offload=cpu"])
    assert str(err.value) == ("zero.offload: cpu moves the optimizer's ZeRO partitions, which stage 0 does not have: "
                              "needs stage 1-3, got 0")
    assert [load_config(RECIPE, [f"zero.stage={s}", "zero.offload=cpu"]).zero.offload for s in (1, 2, 3)] == ["cpu"] * 3


def test_vit_patch_must_divide_image():
    """A ViT patch size that does not divide the image size is refused up front."""
    with pytest.raises(ConfigError, match=r"^model.patch_size: 5 does not divide data.image_size 16"):
        load_config(RECIPE, ["model.backbone=vit_tiny", "model.patch_size=5"])


def test_bad_override_syntax():
    """An override without '=' is refused with the expected form."""
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_base_recipe_is_derived(tmp_path):
    """A recipe with `base:` inherits everything it does not set."""
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {RECIPE}\njob:\n  max_steps: 77\n")
    cfg = load_config(child)
    assert cfg.job.max_steps == 77 and cfg.method.temperature == load_config(RECIPE).method.temperature


def test_derived_recipe_replaces_backbone_options(tmp_path):
    """Sections merge key by key, but a derived recipe's backbone_kwargs replace the base's whole: a ViT recipe on a
    ConvNet one does not inherit the ConvNet's options. An override still sets one option inside them."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  backbone: convnet\n  backbone_kwargs: {norm: gn, width: 0.5}\n  proj_out_dim: 64\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nmodel:\n  backbone: vit_tiny\n  patch_size: 4\n"
                     "  backbone_kwargs: {depth: 2}\n")
    cfg = load_config(child)
    assert cfg.model.backbone_kwargs == {"depth": 2} and cfg.model.proj_out_dim == 64
    assert load_config(child, ["model.backbone_kwargs.embed_dim=96"]).model.backbone_kwargs == {"depth": 2,
                                                                                               "embed_dim": 96}
    data = {"model": {"backbone_kwargs": {"depth": 2}}}
    apply_overrides(data, ["model.backbone_kwargs.depth=3"])
    assert data == {"model": {"backbone_kwargs": {"depth": 2}}}  # the caller's mapping is left as it was


def test_roundtrip_through_dict():
    """to_dict -> config_from_dict gives the same config (what workers and checkpoints receive)."""
    cfg = load_config(RECIPE)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_missing_file(tmp_path):
    """A missing recipe, a directory given as one, a file that is not UTF-8 and an empty one: one line naming the
    path."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/recipe.yaml")
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory, not a YAML recipe$"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"job:\n  run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'latin1.yaml'}: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    for text in ("", "# only a comment\n"):  # (it had been taken as the defaults: SimCLR, whatever was meant)
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"^{tmp_path / 'empty.yaml'}: empty \\(no keys\\); a recipe sets "
                           "at least the method"):
            load_config(tmp_path / "empty.yaml")


def test_key_given_twice_is_refused(tmp_path):
    """A key repeated in one mapping of a recipe (a second ``optim:`` section, a setting given twice) is one line naming
    the key and both lines, in a recipe read directly or as another's base: YAML would drop the first silently. The
    same key in different sections, or in a derived recipe over its base, is no repetition."""
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"base: {RECIPE}\noptim:\n  lr: 1.0e-3\ndata:\n  batch_size: 64\noptim:\n  warmup_steps: 5\n")
    assert config_error(twice, []) == (f"{twice}: key 'optim' is given twice (lines 2 and 6); YAML would keep only "
                                       "the second")
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"base: {RECIPE}\noptim:\n  lr: 1.0e-3\n  warmup_steps: 5\n  lr: 2.0e-3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: nested.yaml\n")
    assert config_error(child, []).startswith(f"{nested}: key 'lr' is given twice (lines 3 and 5)")
    fine = tmp_path / "fine.yaml"
    fine.write_text(f"base: {RECIPE}\noptim:\n  lr: 2.0e-3\ndata:\n  aug:\n    mean: [0.5]\n  batch_size: 32\n")
    cfg = load_config(fine)
    assert cfg.optim.lr == 2.0e-3 and cfg.data.batch_size == 32


def test_cli_rejects_bad_config_before_any_worker(tmp_path):
    """`pretrain train` with a bad key exits 2 with one line on stderr, and writes no run directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", "--config", str(RECIPE), "--set", "optim.lr=-3",
         "--set", f"job.out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: optim.lr: must be > 0, got -3.0"]
    assert not any(tmp_path.iterdir())


def test_normalisation_must_fit_channels():
    """Three mean values for one output channel is refused naming data.aug.mean."""
    with pytest.raises(ConfigError, match=r"^data.aug.mean: has 3 values for 1 channel"):
        load_config(RECIPE, ["data.aug.mean=[0.5, 0.5, 0.5]"])


def test_defaults_are_valid():
    """The config with no recipe at all is valid."""
    load_config(None)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(recipe):
    """Every shipped recipe loads and passes validation (BEiT's once given the tokenizer run it says it needs)."""
    if recipe.name == "beit_digits.yaml":
        with pytest.raises(ConfigError, match=r"^method.tokenizer: beit predicts the visual tokens"):
            load_config(recipe)
        load_config(recipe, ["method.tokenizer=runs/vqvae"])
    else:
        load_config(recipe)


def test_per_view_augmentation_keys():
    """data.view_aug has one mapping of data.aug keys per global view and data.local_aug one for the local crops;
    each is checked like data.aug, naming the view and key."""
    cfg = load_config(RECIPE, ["data.view_aug=[{blur_prob: 1.0}, {blur_prob: 0.1, solarize_prob: 0.2}]"])
    first, second = cfg.data.view_augments()
    assert (first.blur_prob, first.solarize_prob, second.blur_prob, second.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    assert first.crop_scale == cfg.data.aug.crop_scale and first.mean == cfg.data.aug.mean
    assert load_config(RECIPE).data.view_augments() is None
    dino = load_config(ROOT / "configs" / "dino_digits.yaml", ["data.local_aug={blur_prob: 0.5}"])
    local = dino.data.local_augment()
    assert local.blur_prob == 0.5 and local.crop_scale == dino.data.local_crop_scale
    for sets, message in (
        (["data.view_aug=[{blur_prob: 1.0}]"], "data.view_aug: has 1 mappings for 2 global views"),
        (["data.view_aug=[{blur_prob: 1.0}, {blurr: 0.1}]"], "data.view_aug[1].blurr: not a data.aug key"),
        (["data.view_aug=[{}, {mean: [0.1]}]"], "data.view_aug[1].mean: not a data.aug key that may differ"),
        (["data.view_aug=[{}, {blur_prob: 2}]"], "data.view_aug[1].blur_prob: must be in [0, 1], got 2.0"),
        (["data.local_aug={blur_prob: 0.5}"], "data.local_aug: is set but there are no local_views"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(RECIPE, sets)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"^data.local_aug.crop_scale: not a data.aug key"):
        load_config(ROOT / "configs" / "dino_digits.yaml", ["data.local_aug={crop_scale: [0.1, 0.2]}"])


def test_plain_scalars_read_as_yaml_1_2(tmp_path):
    """YAML 1.1 (PyYAML's) read a run named `no` as false, `12:30` as 750, `0755` as 493, `2026-12-03` as a date and
    `1e-5` (no dot) as text; recipes and --set read them as YAML 1.2 does: the name as written, the number as a
    number. A bool field still takes yes/no/on/off."""
    for name in ("no", "off", "yes", "12:30", "0755", "2026-12-03", "2026", "1_000"):
        assert load_config(RECIPE, [f"job.run_name={name}"]).job.run_name == name
        recipe = tmp_path / "named.yaml"
        recipe.write_text(f"base: {RECIPE}\njob:\n  run_name: {name}\n  progress: off\n  use_gpu: no\n")
        cfg = load_config(recipe)
        assert (cfg.job.run_name, cfg.job.progress, cfg.job.use_gpu) == (name, False, "false")
    for name in ("1e5", "0o17", ".inf", "no", "0755"):  # a run's config.yaml reads back as written, quoted where due
        dump_config(load_config(RECIPE, [f"job.run_name='{name}'"]), tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml").job.run_name == name
    cfg = load_config(RECIPE, ["job.progress=no", "job.use_gpu=yes", "optim.lr=5e-4", "optim.weight_decay=1E-2"])
    assert (cfg.job.progress, cfg.job.use_gpu, cfg.optim.lr, cfg.optim.weight_decay) == (False, "true", 5e-4, 1e-2)
    # untyped values: a backbone's options and the per-view augmentations take the number too
    vit = load_config(ROOT / "configs" / "dino_vit_digits.yaml", ["model.backbone_kwargs.layer_scale=1e-5",
                                                                   "data.view_aug=[{blur_prob: 1e-1}, {}]"])
    assert vit.model.backbone_kwargs["layer_scale"] == 1e-5 and vit.data.view_augments()[0].blur_prob == 0.1
    assert config_error(RECIPE, ["data.num_views=2", "data.view_aug=[{blur_prob: x}, {}]"]) == (
        "data.view_aug[0].blur_prob: expected a number, got 'x'")


def test_merge_keys_merge(tmp_path):
    """`<<: *anchor` (a YAML merge key) merges the anchored mapping; a merged key set again is its override, no
    repetition, while a key given twice beside it still is."""
    recipe = tmp_path / "anchors.yaml"
    recipe.write_text(f"base: {RECIPE}\n_defaults: &adam {{lr: 0.002, warmup_steps: 3}}\n")
    assert config_error(recipe, []).startswith("_defaults: unknown key")  # an anchor's home must be a known key
    recipe.write_text(f"base: {RECIPE}\noptim:\n  <<: &adam {{lr: 0.002, warmup_steps: 3}}\n  lr: 0.001\n"
                      "eval:\n  <<: {knn_every: 7}\n")
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.eval.knn_every) == (0.001, 3, 7)
    recipe.write_text(f"base: {RECIPE}\noptim:\n  <<: {{lr: 0.002}}\n  warmup_steps: 3\n  warmup_steps: 4\n")
    assert config_error(recipe, []).endswith("key 'warmup_steps' is given twice (lines 4 and 5); YAML would keep "
                                             "only the second")


def test_odd_values_and_keys_are_one_line(tmp_path):
    """Non-finite numbers, keys that are not names, a base that is not one path, control characters in a run name:
    one line naming the key (they had passed, or raised TypeError from deep inside). An empty section is its
    defaults."""
    assert config_error(RECIPE, ["optim.lr=.inf"]) == "optim.lr: expected a finite number, got inf"
    assert config_error(RECIPE, ["method.temperature=.nan"]) == "method.temperature: expected a finite number, got nan"
    assert config_error(RECIPE, ["tracking.experiment=' '"]) == ("tracking.experiment: must name an MLflow "
                                                                 "experiment, got ' '")
    assert config_error(RECIPE, ["optim={1: 2}"]).startswith("optim.1: unknown key (known: ")
    assert config_error(RECIPE, ["optim={1: 2, a: 3}"]).startswith("optim.a: unknown key (known: ")
    assert config_error(RECIPE, ["optim={~: 3}"]).startswith("optim.None: unknown key (known: ")
    assert config_error(RECIPE, ["job.run_name=\"a\\nkind: Pod\""]) == (
        "job.run_name: must not contain control characters (a newline, a tab), got 'a\\nkind: Pod'")
    for base in ("[a.yaml]", "3", "''"):
        recipe = tmp_path / "base.yaml"
        recipe.write_text(f"base: {base}\n")
        assert config_error(recipe, []).startswith(f"{recipe}: base: expected the path of one recipe, got ")
    recipe.write_text(f"base: {RECIPE}\noptim:\n  # lr: 0.1\n")
    assert load_config(recipe).optim == load_config(RECIPE).optim


def test_a_mapping_override_merges_into_its_section():
    """`--set data={batch_size: 64}` sets that key and keeps the recipe's others (it had reset data.channels to 3 and
    the augmentations to their defaults), as a derived recipe merges; backbone options are still replaced whole."""
    cfg, recipe = load_config(RECIPE, ["data={batch_size: 64}"]), load_config(RECIPE)
    assert cfg.data.batch_size == 64 and cfg.data.channels == recipe.data.channels == 1
    assert cfg.data.aug == recipe.data.aug
    vit = ROOT / "configs" / "dino_vit_digits.yaml"
    assert load_config(vit, ["model.backbone_kwargs={depth: 1}"]).model.backbone_kwargs == {"depth": 1}


def test_local_paths_are_absolute_for_the_workers(tmp_path, monkeypatch):
    """A relative data.source, eval.dataset, data.cache_dir or sqlite tracking store is the one beside the command:
    written absolute, so Ray's workers and a scheduler's job (which start elsewhere) read and write the same (a
    relative data.source had failed in the workers, a relative store had been written in Ray's temporary folder and
    lost). Built-in names, URLs and `~` stay as they are."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RECIPE, ["data.source=shards/a", "eval.dataset=../held out", "data.cache_dir=cache",
                               "tracking.uri=sqlite:///ml/mlflow.db"])
    assert cfg.data.source == str(tmp_path / "shards" / "a") and cfg.eval.dataset == str(tmp_path.parent / "held out")
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    cfg = load_config(RECIPE, ["data.source=https://host/shards", "eval.dataset=samples",
                               "tracking.uri=sqlite:////srv/mlflow.db"])
    assert (cfg.data.source, cfg.eval.dataset, cfg.data.cache_dir, cfg.tracking.uri) == (
        "https://host/shards", "samples", "~/.cache/ssl-pretrain", "sqlite:////srv/mlflow.db")
    assert load_config(RECIPE, ["data.source=~/shards"]).data.source == str(Path("~/shards").expanduser())


def test_a_seed_numpy_cannot_take_is_refused():
    """job.seed outside 0..MAX_SEED: every rank seeds numpy (seeds below 2**32) with seed x 1000 + 1 + rank; a seed
    past that had passed every check and failed in each worker at its start."""
    from pretrain.config import MAX_SEED

    for seed in (-1, MAX_SEED + 1, 10**20):
        assert config_error(RECIPE, [f"job.seed={seed}"]) == (
            f"job.seed: must be in 0..{MAX_SEED} (each rank seeds numpy, whose seeds are below 2**32, with seed x 1000 "
            f"+ 1 + its rank), got {seed}")
    assert load_config(RECIPE, [f"job.seed={MAX_SEED}"]).job.seed * 1000 + 1 + 999_999 < 2**32
