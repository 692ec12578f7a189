import re

import pytest
import yaml

from pipeline.config import (ConfigError, load_cluster_config, load_config, reference, reference_in_docs,
                             reference_markdown)
from pipeline.registry import STAGES

from conftest import ROOT, small_config

BAD = [
    # (section, key, value, message fragment)
    ("train", "lr", "abc", "train.lr: expected a float, got 'abc'"),
    ("train", "lr", -1.0, "train.lr: must be > 0"),
    ("train", "lr", True, "train.lr: expected a float"),
    ("train", "zero_stage", 4, "train.zero_stage: must be <= 3"),
    ("train", "zero_stage", 2.5, "train.zero_stage: expected an int"),
    ("train", "precision", "fp8", "train.precision: expected one of 'auto', 'fp32', 'bf16'"),
    ("train", "warmup_fraction", 1.0, "train.warmup_fraction: must be < 1"),
    ("train", "learning_rate", 1e-4, "train.learning_rate: unknown key"),
    ("data", "train_tokens", -5, "data.train_tokens: must be >= 0"),
    ("data", "train_tokens", "lots", "data.train_tokens: expected an int, got 'lots'"),
    ("data", "seq_len", 4, "data.seq_len: must be >= 8"),
    ("data", "files", "corpus.txt", "data.files: expected a list of strings"),
    ("data", "source", "csv", "data.source: expected one of"),
    ("data", "heldout_fraction", 0.0, "data.heldout_fraction: must be > 0"),
    ("data", "train_fraction", 0.5, "data.train_tokens: give exactly one of"),
    ("data", "chat_template", True, "data.prompt_field: required when data.chat_template is true"),
    ("data", "train_tokens", 64, "data.train_tokens: 64 tokens are below one sequence (128)"),
    ("exits", "depths", [0, 3], "exits.depths: every depth must be >= 1"),
    ("exits", "depths", [3, 3], "exits.depths: duplicate depths"),
    ("exits", "depths", ["three"], "exits.depths[0]: expected an int, got 'three'"),
    ("teacher", "format", "full", "teacher.format: expected one of 'topk', 'sampled'"),
    ("teacher", "k", 0, "teacher.k: must be > 0"),
    ("model", "backbone", "", "model.backbone: required"),
    ("model", "trust_remote_code", "yes", "model.trust_remote_code: expected a boolean"),
    ("run", "dir", 3, "run.dir: expected a string, got 3"),
]


@pytest.mark.parametrize("section,key,value,message", BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD])
def test_bad_values_name_the_key(tmp_path, section, key, value, message):
    cfg = small_config(tmp_path / "run", "")
    cfg.setdefault(section, {})[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_structural_errors(tmp_path):
    path = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(path)
    path.write_text("run: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)
    path.write_text(yaml.safe_dump({"runs": {"dir": "x"}}))
    with pytest.raises(ConfigError, match="^runs: unknown key"):
        load_config(path)
    path.write_text(yaml.safe_dump({"train": 5}))
    with pytest.raises(ConfigError, match="^train: expected a mapping"):
        load_config(path)
    path.write_text(yaml.safe_dump({"model": {"backbone": "m"}, "data": {"files": ["x"]}}))
    with pytest.raises(ConfigError, match="data.train_tokens: give exactly one"):
        load_config(path)
    path.write_text(yaml.safe_dump({"model": {"backbone": "m"}, "data": {"source": "hub", "train_tokens": 1000}}))
    with pytest.raises(ConfigError, match="data.hub_name: required"):
        load_config(path)
    path.write_text(yaml.safe_dump({"model": {"backbone": "m"}, "data": {"files": ["x"], "train_fraction": 0.1}}))
    with pytest.raises(ConfigError, match="data.reference_tokens: required"):
        load_config(path)


def test_overrides_and_yaml_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    cfg = small_config(tmp_path / "run", "")
    cfg["train"] = {"lr": "5e-4", "tokens_per_step": "1_048_576"}  # PyYAML reads both as strings
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path, ["train.lr=1e-4", "run.dir=/tmp/x", "exits.depths=[1, 4]", "data.train_tokens=1e4"])
    assert loaded.train.lr == 1e-4 and loaded.train.tokens_per_step == 1_048_576
    assert loaded.run.dir == "/tmp/x" and loaded.exits.depths == [1, 4] and loaded.data.train_tokens == 10_000
    with pytest.raises(ConfigError, match="^train.lrr: unknown key"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="^train.lr: expected a float, got 'abc'"):
        load_config(path, ["train.lr=abc"])


def test_train_fraction_of_reference(tmp_path):
    path = tmp_path / "c.yaml"
    cfg = small_config(tmp_path / "run", "", data={"train_tokens": 0, "train_fraction": 0.002,
                                                    "reference_tokens": 15_000_000})
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).data.train_token_count == 30_000


def test_hash_is_stable_and_sensitive(tmp_path):
    cfg = small_config(tmp_path / "run", "")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(cfg, sort_keys=True))
    b.write_text(yaml.safe_dump(dict(reversed(list(cfg.items()))), sort_keys=False))
    assert load_config(a).hash() == load_config(b).hash()
    assert load_config(a).hash("data") == load_config(a, ["train.lr=0.1"]).hash("data")
    assert load_config(a).hash("data") != load_config(a, ["data.seed=1"]).hash("data")
    assert load_config(a).hash() != load_config(a, ["train.lr=0.1"]).hash()
    # how a run executes may change on resume: batch and chunk sizes, checkpoint cadence, snapshots
    execution = ["teacher.batch_size=2", "teacher.chunk_size=64", "train.chunk_size=64", "train.checkpoint_every=7",
                 "train.keep_checkpoints=5", "train.snapshots=[3]", "eval.batch_size=1", "eval.chunk_size=32"]
    assert load_config(a).hash() == load_config(a, execution).hash()


@pytest.mark.parametrize("name", ["demo.yaml", "llama3-8b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    if name == "llama3-8b.yaml":
        assert cfg.exits.depths == [15, 18, 21] and cfg.data.seq_len == 4096 and cfg.train.zero_stage == 2
        assert cfg.data.train_token_count == 31_500_000_000 and cfg.train.tokens_per_step == 1_048_576


def test_make_targets_and_scripts_follow_the_stage_registry():
    makefile = (ROOT / "Makefile").read_text()
    for stage in STAGES.values():
        assert f"stage-{stage.name}" in makefile and (ROOT / "stages" / stage.script).exists(), stage


def test_every_key_is_documented_and_the_docs_reference_is_current():
    assert all(doc for _, _, _, doc in reference()), [key for key, _, _, doc in reference() if not doc]
    assert reference_in_docs() == reference_markdown(), "docs/config.md is stale: run `python -m pipeline.config`"


def test_the_code_map_names_every_module():
    """docs/DESIGN.md's code map is the only one: it names every module of pipeline/ and nothing gone."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    code_map = design.split("## Code layout")[1].split("\n## ")[0]
    named = set(re.findall(r"^      (\w+\.py) ", code_map, re.M))
    modules = {p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"}
    assert named == modules, f"missing: {sorted(modules - named)}, gone: {sorted(named - modules)}"


def test_shipped_site_configs_load_with_a_cpu_only_tokenize():
    for path in sorted((ROOT / "configs" / "cluster").glob("*.yaml")):
        site = load_cluster_config(path)
        assert site.tokenize.gpus_per_node == 0, path
