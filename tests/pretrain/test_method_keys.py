"""``method.*`` keys that the chosen method does not read (SimCLR's ``method.queue_size``), and ``optim.*`` keys that
the chosen optimizer does not (AdamW's betas under LARS), are refused in one line where a recipe or ``--set`` gives
them; each method's ``config_keys`` is checked against what its code reads."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

import pretrain.methods.base as base
from pretrain.cli import main
from pretrain.config import OPTIM_KEYS, MethodConfig, OptimConfig, check_optim_keys, load_config, set_keys
from pretrain.methods import COMMON_KEYS, METHODS, check_method_keys
from pretrain.trainer import build_method

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name for f in dataclasses.fields(MethodConfig)} - COMMON_KEYS


def _reads(node: ast.AST) -> set[str]:
    """MethodConfig fields read in ``node``'s code: ``cfg.method.x``, ``m.x`` (m = cfg.method), ``self.cfg.x``; not
    ``self.x`` (an attribute of the method, set from the config where it is read)."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in FIELDS
            and not (isinstance(n.value, ast.Name) and n.value.id == "self")}


BASE = ast.parse(inspect.getsource(base))
HELPERS = {n.name: _reads(n) for n in BASE.body if isinstance(n, ast.FunctionDef)}


def _module_reads(module: str) -> set[str]:
    """What a method module reads, with the fields of the base helpers it calls (require_shared_queue: the queue)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    called = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & HELPERS.keys()
    return (_reads(tree) | {f for name in called for f in HELPERS[name]}) - COMMON_KEYS


def _modules(cls) -> set[str]:
    return {c.__module__ for c in cls.__mro__ if c.__module__.startswith("pretrain.methods.")
            and c.__module__ != base.__name__}


def test_the_declared_keys_are_what_the_code_reads():
    """Every field a method module reads is declared by a method of that module (exactly, where the module holds one
    method), and no method declares a field its modules never read; the base class reads none itself."""
    assert not _reads(next(n for n in BASE.body if isinstance(n, ast.ClassDef) and n.name == "SSLMethod"))
    by_module: dict[str, set[str]] = {}
    for name, cls in METHODS.items():
        read = set().union(*(_module_reads(m) for m in _modules(cls)))
        assert cls.config_keys <= read, (name, sorted(cls.config_keys - read))
        by_module.setdefault(cls.__module__, set()).update(cls.config_keys)
    for module, declared in by_module.items():
        assert _module_reads(module) <= declared, (module, sorted(_module_reads(module) - declared))


@dataclasses.dataclass
class _Recording(MethodConfig):
    """A MethodConfig that notes which fields are read."""

    def __getattribute__(self, name):
        if name in FIELDS:
            READ.add(name)
        return object.__getattribute__(self, name)


READ: set[str] = set()


def _recipes() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "configs").glob("*_digits.yaml")) + [ROOT / "configs" / "colorization_samples.yaml"]:
        if path.name != "beit_digits.yaml":  # (needs a tokenizer run: test_beit)
            found.setdefault(load_config(path).method.name, path)
    return found


@pytest.mark.parametrize("name", sorted(_recipes()))
def test_a_method_reads_no_key_it_does_not_declare(name, tmp_path):
    """Each method checked and built from its digits recipe: every method field it reads is among its config_keys
    (a module of two methods, MoCo v2 and v3's, declares per method: the static check cannot tell them apart)."""
    cfg = load_config(_recipes()[name], [f"data.cache_dir={tmp_path}"])
    values = {f.name: getattr(cfg.method, f.name) for f in dataclasses.fields(MethodConfig)}
    cfg = dataclasses.replace(cfg, method=_Recording(**values))
    READ.clear()
    METHODS[name].check_config(cfg)
    build_method(cfg, distributed=False)
    assert READ <= METHODS[name].config_keys, sorted(READ - METHODS[name].config_keys)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_recipe_sets_a_key_its_method_does_not_use(recipe):
    """Keys a recipe inherits from a base recipe of another method (MAE's mask_ratio under I-JEPA) are not its own."""
    extra = ["method.tokenizer=runs/vqvae"] if recipe.name == "beit_digits.yaml" else []
    cfg = load_config(recipe, extra)
    check_method_keys(cfg.method, set_keys(recipe, extra))
    check_optim_keys(cfg.optim, set_keys(recipe, extra, "optim"))


def test_a_key_the_method_does_not_use_is_refused_in_one_line(tmp_path, capsys):
    """`--set method.queue_size=4096` on SimCLR had been taken and ignored: refused before anything is written,
    naming the methods that use it; a key of the method is taken; a resume refuses one too."""
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=a", "--set", "method.queue_size=4096"]) == 2
    assert capsys.readouterr().err.strip() == ("error: method.queue_size: simclr does not use it (it is moco_v2, "
                                               "nnclr, swav's); remove it, or set method.name to one of those")
    assert not (tmp_path / "a").exists()
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=b", "--set", "method={decoupled: true, "
                 "mask_ratio: 0.6}"]) == 2
    assert "error: method.mask_ratio: simclr does not use it (it is mae, simmim's)" in capsys.readouterr().err
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=c", "--set", "method.temperature=0.5"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "c"), "--dry-run", "--set", "method.koleo_weight=0.1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: method.koleo_weight: simclr does not use it")
    # another method set over a recipe: the recipe's keys (SimCLR's temperature) are not set for it
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=e", "--set", "method.name=byol"]) == 0
    # a recipe deriving from another method's (I-JEPA's from MAE's) inherits keys it does not use: not its own
    derived = tmp_path / "mine.yaml"
    derived.write_text(f"base: {ROOT / 'configs' / 'ijepa_digits.yaml'}\nmethod:\n  teacher_momentum: 0.99\n")
    assert main(["train", "--config", str(derived), "--dry-run", *sets, "--set", "job.run_name=d"]) == 0


def test_an_optimizer_key_the_optimizer_does_not_use_is_refused_in_one_line(tmp_path, capsys):
    """`--set optim.name=lars --set optim.betas=[0.9,0.95]` had been taken and the betas ignored: refused before
    anything is written, naming the optimizers that use the key; the key under its optimizer is taken; a recipe's
    own AdamW betas are not set where the overrides name another optimizer; a resume refuses one too."""
    assert set(OPTIM_KEYS) < {f.name for f in dataclasses.fields(OptimConfig)}
    sets = ["--set", f"job.out_dir={tmp_path}", "--set", f"data.cache_dir={tmp_path}"]
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=a", "--set", "optim.name=lars",
                 "--set", "optim.betas=[0.9, 0.95]"]) == 2
    assert capsys.readouterr().err.strip() == ("error: optim.betas: lars does not use it (it is adamw's); remove it, "
                                               "or set optim.name to one of those")
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=a", "--set",
                 "optim={name: sgd, trust_coefficient: 0.01}"]) == 2
    assert "error: optim.trust_coefficient: sgd does not use it (it is lars, larc's)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    mae = ROOT / "configs" / "mae_digits.yaml"  # AdamW with betas (0.9, 0.95)
    assert main(["train", "--config", str(mae), "--dry-run", *sets, "--set", "job.run_name=b",
                 "--set", "optim.name=lars"]) == 0
    assert main(["train", "--dry-run", *sets, "--set", "job.run_name=c", "--set", "optim.name=sgd",
                 "--set", "optim.momentum=0.8"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "c"), "--dry-run", "--set", "optim.betas=[0.8, 0.9]"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: optim.betas: sgd does not use it")
    assert main(["train", "--resume", str(tmp_path / "c"), "--dry-run", "--set", "optim.momentum=0.85"]) == 0
