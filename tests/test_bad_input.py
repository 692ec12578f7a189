"""Bad input: corrupt shards and manifests, inputs from another tokenizer / backbone / exit list /
sequence length, malformed configs, and the security rules. Each is refused before use, with one
line that names the file or key and the failed check, and leaves earlier output untouched.
Passing cases go to test-artifacts/fault-report.json."""
import ast
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.shards import FORMAT_VERSION
from pipeline.train_data import TrainBatches
from pipeline.training import weights_only_checkpoint_engine

from conftest import BACKBONE, ROOT, built_once, run_in_process, stage_command, tiny_config, tree_bytes

# consumer stage -> (the inputs it reads, the folder damaged, the shard damaged (split, index, file), its output)
CONSUMERS = {
    "teacher-logits": (("tokens",), "tokens", ("train", 1, "shard-000001.tar"), "teacher"),
    "train-exits": (("tokens", "teacher"), "teacher", ("train", 1, "shard-000001.tar"), "exits"),
    "evaluate": (("tokens", "exits"), "tokens", ("heldout", 0, "heldout/shard-000000.tar"), "eval"),
}


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# name -> (damage(folder, split, index, file, foreign folder), the refusal it must give)
CORRUPTIONS = {
    "flipped byte": (lambda d, s, i, f, o: _flip_byte(d / f), r"{file}: sha256 is \w+, the manifest says \w+ \(corrupt or replaced\)"),
    "truncated tar": (lambda d, s, i, f, o: (d / f).write_bytes((d / f).read_bytes()[:-700]),
                      r"{file}: size is \d+ bytes, the manifest says \d+ \(truncated or replaced\)"),
    "deleted shard": (lambda d, s, i, f, o: (d / f).unlink(), r"{file}: missing \(listed in manifest.json\)"),
    "shard from another run": (lambda d, s, i, f, o: shutil.copy(o / f, d / f), r"{file}: (sha256|size) is"),
    "manifest: edited checksum": (
        lambda d, s, i, f, o: _edit_manifest(d, lambda m: m["splits"][s]["shards"][i].update(sha256="0" * 64)),
        r"{file}: sha256 is \w+, the manifest says 0{{64}}"),
    "manifest: edited format version": (lambda d, s, i, f, o: _edit_manifest(d, lambda m: m.update(format_version=99)),
                                        r"manifest.json: run-directory format 99, this pipeline writes format \d+: start a new run.dir"),
    "manifest: not JSON": (lambda d, s, i, f, o: (d / "manifest.json").write_text('{"stage": '),
                           r"manifest.json: not valid JSON"),
}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, tracking_uri, assets):
    """Tokens and targets of another run (another data seed): where foreign shards come from."""
    def build(folder: Path) -> Path:
        config = tiny_config(folder, tracking_uri, "run", data={"seed": 7})
        for stage in ("tokenize", "teacher-logits"):
            code, _, stderr = run_in_process(stage, config)
            assert code == 0, stderr[-3000:]
        return folder / "run"

    return built_once(tmp_path_factory, "foreign", build)


def first_train_shard(stage_dir: Path, cfg) -> str:
    """The train shard train-exits (one rank) reads first: the first of epoch 0's seeded order."""
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    return TrainBatches(stage_dir, manifest, None, cfg.train.micro_batch_size, 0, 1, cfg.train.seed).epoch_order(0)[0]["file"]


def refusal(stage: str, config: Path, *overrides: str) -> str:
    """Run the stage through its command line's entry point (train-exits as one process), in this
    process (the command line itself: test_bad_overrides_and_missing_config_file); return its one
    error line."""
    code, _, stderr = run_in_process(stage, config, *overrides)
    assert code == 2, f"{stage} exited {code}, not 2:\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.integration
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_corrupt_input_is_refused_before_use(finished_run, foreign, tmp_path, tracking_uri, ledger, consumer, corruption):
    run_dir, _, _ = finished_run
    inputs, damaged, (split, index, file), output = CONSUMERS[consumer]
    config = tiny_config(tmp_path, tracking_uri, "run")
    if consumer == "train-exits":  # it verifies a shard when it first opens it: damage the first it reads
        file = first_train_shard(run_dir / damaged, load_config(config))
        index = int(file[len("shard-"):-len(".tar")])
    for name in inputs:
        shutil.copytree(run_dir / name, tmp_path / "run" / name, ignore=shutil.ignore_patterns("checkpoints"))
    damage, expected = CORRUPTIONS[corruption]
    damage(tmp_path / "run" / damaged, split, index, file, foreign / damaged)
    inputs_before = {name: tree_bytes(tmp_path / "run" / name) for name in inputs}
    error = refusal(consumer, config)
    assert re.search(expected.format(file=re.escape(file)), error), error
    assert str(tmp_path / "run" / damaged) in error  # the full path of the file that failed
    assert inputs_before == {name: tree_bytes(tmp_path / "run" / name) for name in inputs}
    produced = tmp_path / "run" / output
    # nothing built from the bad shard: no manifest, no export, no metrics, no output for that shard
    assert not any((produced / name).exists() for name in ("manifest.json", "exits.safetensors", "metrics.json", file))
    assert not (produced / "checkpoints").exists()
    ledger("bad input", f"{consumer} reading {damaged}: {corruption}", "refused")


@pytest.mark.integration
def test_targets_of_an_earlier_format_are_refused_in_one_line(finished_run, tmp_path, tracking_uri, ledger):
    """Teacher shards of the per-draw sampled format (run-directory format 2: every draw's id and log-prob
    stored) are refused by train-exits, not converted; so is an old target format under the current version."""
    config = tiny_config(tmp_path, tracking_uri, "run")
    for name in ("tokens", "teacher"):
        shutil.copytree(finished_run[0] / name, tmp_path / "run" / name)
    teacher = tmp_path / "run" / "teacher"
    per_draw = {"format": "sampled", "entries": 24, "compact": True, "vocab_size": 49152, "id_bits": 16,
                "logprob_bits": 12, "logprob_range": 24.0}
    _edit_manifest(teacher, lambda m: m.update(format_version=2, target_format=per_draw))
    error = refusal("train-exits", config)
    assert error == (f"error: {teacher / 'manifest.json'}: run-directory format 2, this pipeline writes format "
                     f"{FORMAT_VERSION}: start a new run.dir")
    _edit_manifest(teacher, lambda m: m.update(format_version=FORMAT_VERSION))
    error = refusal("train-exits", config)
    assert error.startswith(f"error: {teacher / 'manifest.json'}: target_format {per_draw} is not a format this "
                            "version reads"), error
    assert error.endswith("rerun teacher-logits into a new run.dir")
    assert not (tmp_path / "run" / "exits").exists()
    ledger("bad input", "train-exits reading teacher targets of an earlier format", "refused")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """The backbone's tokenizer with one token added: another tokenizer fingerprint."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    tokenizer.add_tokens(["<balcony-extra-token>"])
    tokenizer.save_pretrained(folder)
    return folder


# (case, the stage run, the inputs it gets, overrides, the refusal)
MISMATCHES = [
    ("tokens from another tokenizer -> teacher", "teacher-logits", ("tokens",), ["model.tokenizer={tokenizer}"],
     r"tokens/manifest.json: tokenizer_fingerprint is '\w+', expected '\w+'"),
    ("tokens from another tokenizer -> evaluate", "evaluate", ("tokens", "exits"), ["model.tokenizer={tokenizer}"],
     r"tokens/manifest.json: tokenizer_fingerprint is"),
    ("targets from another backbone -> train", "train-exits", ("tokens", "teacher"), ["model.num_layers=4"],
     r"teacher/manifest.json: backbone_fingerprint is '\w+', expected '\w+'"),
    ("exits from another backbone -> evaluate", "evaluate", ("tokens", "exits"), ["model.num_layers=4"],
     r"exits/balcony_config.json: backbone_fingerprint is '\w+', this backbone's is '\w+'"),
    ("exits for another depth list -> evaluate", "evaluate", ("tokens", "exits"), ["exits.depths=[2]"],
     r"exits/balcony_config.json: depths is \[1, 2\], this config's exits.depths is \[2\]"),
    ("checkpoints for another depth list -> train", "train-exits", ("tokens", "teacher", "exits"), ["exits.depths=[2]"],
     r"exits holds output written with depths=\[1, 2\].*; this run has depths=\[2\]"),
    ("seq_len changed -> teacher", "teacher-logits", ("tokens",), ["data.seq_len=64"],
     r"tokens/manifest.json: seq_len is 128, expected 64"),
    ("seq_len changed -> train", "train-exits", ("tokens", "teacher"), ["data.seq_len=64"],
     r"teacher/manifest.json: seq_len is 128, expected 64"),
    ("seq_len changed -> evaluate", "evaluate", ("tokens", "exits"), ["data.seq_len=64"],
     r"tokens/manifest.json: seq_len is 128, expected 64"),
    ("other data into finished tokens -> tokenize", "tokenize", ("tokens",), ["data.seed=3"],
     r"tokens holds output written with .*input_fingerprint|tokens holds output written with .*config_hash"),
    ("other target format into finished targets -> teacher", "teacher-logits", ("tokens", "teacher"), ["teacher.format=sampled"],
     r"teacher holds output written with .*target_format"),
]


@pytest.mark.integration
@pytest.mark.parametrize("case,stage,inputs,overrides,expected", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_input_is_refused(finished_run, other_tokenizer, tmp_path, tracking_uri, ledger,
                                     case, stage, inputs, overrides, expected):
    run_dir, _, _ = finished_run
    config = tiny_config(tmp_path, tracking_uri, "run")
    for name in inputs:
        shutil.copytree(run_dir / name, tmp_path / "run" / name, ignore=shutil.ignore_patterns("checkpoints"))
    before = tree_bytes(tmp_path / "run")
    error = refusal(stage, config, *(o.format(tokenizer=other_tokenizer) for o in overrides))
    assert re.search(expected, error), error
    assert tree_bytes(tmp_path / "run") == before  # nothing written, nothing damaged
    ledger("bad input", f"mismatch: {case}", "refused")


# ---------------------------------------------------------------- malformed configs

# (stage, how the tiny config is changed: {section: {key: value}} or a raw text, the key the error names)
MALFORMED = [
    ("tokenize", {"data": {"budget": 5}}, "data.budget: unknown key"),
    ("tokenize", {"training": {"lr": 1}}, "training: unknown key"),
    ("tokenize", {"data": {"seq_len": "long"}}, "data.seq_len: expected an int, got 'long'"),
    ("tokenize", {"data": {"train_tokens": -1}}, "data.train_tokens: must be >= 0"),
    ("tokenize", {"data": {"train_tokens": 0}}, "data.train_tokens: give exactly one of train_tokens and train_fraction"),
    ("tokenize", {"data": {"train_fraction": 0.5, "train_tokens": 0}}, "data.reference_tokens: required"),
    ("tokenize", {"data": {"heldout_fraction": 1.5}}, "data.heldout_fraction: must be < 1"),
    ("tokenize", {"data": {"source": "csv"}}, "data.source: expected one of"),
    ("tokenize", {"data": {"files": "corpus.jsonl"}}, "data.files: expected a list of strings"),
    ("tokenize", {"data": {"files": ["/nonexistent/*.jsonl"]}}, "data.files: no file matches '/nonexistent/*.jsonl'"),
    ("tokenize", {"model": {"backbone": "/nonexistent/model"}}, "model.backbone"),
    ("tokenize", {"model": {"dtype": "fp8"}}, "model.dtype: expected one of"),
    ("tokenize", {"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code: expected a boolean"),
    ("tokenize", {"run": {"dir": 3}}, "run.dir: expected a string, got 3"),
    ("teacher-logits", {"teacher": {"k": 100_000}}, "teacher.k: must be below the vocabulary size 49152, got 100000"),
    ("teacher-logits", {"teacher": {"format": "full"}}, "teacher.format: expected one of 'topk', 'sampled'"),
    ("teacher-logits", {"teacher": {"logprob_bits": 20}}, "teacher.logprob_bits: must be <= 16"),
    ("train-exits", {"exits": {"depths": [3]}}, "exits.depths: 3 is out of range"),
    ("train-exits", {"exits": {"depths": [0, 2]}}, "exits.depths: every depth must be >= 1"),
    ("train-exits", {"exits": {"depths": [2, 2]}}, "exits.depths: duplicate depths"),
    ("train-exits", {"train": {"tokens_per_step": 1000}}, "train.tokens_per_step: 1000 is not a multiple of"),
    ("train-exits", {"train": {"zero_stage": 4}}, "train.zero_stage: must be <= 3"),
    ("train-exits", {"train": {"lr": "fast"}}, "train.lr: expected a float, got 'fast'"),
    ("evaluate", {"eval": {"repeats": 0}}, "eval.repeats: must be > 0"),
    ("evaluate", {"eval": {"latency_batches": "8"}}, "eval.latency_batches: expected a list of ints"),
    ("evaluate", {"eval": {"speculative_batches": [4, 8]}}, "eval.speculative_batches: [4, 8] must include 1"),
    ("evaluate", {"eval": {"draft_taus": [0.5, 1.0]}}, "eval.draft_taus: [0.5, 1.0] is not a non-empty list of taus in (0, 1)"),
    ("tokenize", "run: [1, 2", "not valid YAML"),
    ("tokenize", "- just\n- a list\n", "expected a mapping of sections"),
]


@pytest.mark.integration
@pytest.mark.parametrize("stage,change,expected", MALFORMED, ids=[m[2].split(":")[0] + f"-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_config_is_a_one_line_error_and_starts_nothing(finished_run, tmp_path, tracking_uri, ledger,
                                                                 stage, change, expected):
    run_dir, _, _ = finished_run
    inputs = {"tokenize": (), "teacher-logits": ("tokens",), "train-exits": ("tokens", "teacher"),
              "evaluate": ("tokens", "exits")}[stage]
    for name in inputs:
        shutil.copytree(run_dir / name, tmp_path / "run" / name, ignore=shutil.ignore_patterns("checkpoints"))
    config = tiny_config(tmp_path, tracking_uri, "run")
    if isinstance(change, str):
        config.write_text(change)
    else:
        cfg = yaml.safe_load(config.read_text())
        for section, values in change.items():
            cfg.setdefault(section, {}).update(values)
        config.write_text(yaml.safe_dump(cfg))
    before = tree_bytes(tmp_path / "run") if (tmp_path / "run").exists() else {}
    error = refusal(stage, config)
    assert expected in error and "\n" not in error, error
    after = tree_bytes(tmp_path / "run") if (tmp_path / "run").exists() else {}
    assert after == before, "a malformed config must not start any work"
    ledger("bad input", f"config ({stage}): {expected}", "refused")


def test_bad_overrides_and_missing_config_file(tmp_path, ledger):
    for args, expected in ((["--config", str(tmp_path / "missing.yaml")], "config file"),
                           (["--config", str(ROOT / "configs/demo.yaml"), "data.seq_len"], "override 'data.seq_len': expected key.path=value"),
                           (["--config", str(ROOT / "configs/demo.yaml"), "train.lr.x=1"], "train.lr.x: lr is not a section")):
        proc = subprocess.run([*stage_command("tokenize", Path("x"))[:2], *args], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        ledger("bad input", f"command line: {expected}", "refused")


# ---------------------------------------------------------------- security


def _calls(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                yield path, node


def test_no_pickle_loads_and_no_remote_code_by_default(ledger):
    """Static: every torch.load passes weights_only=True; trust_remote_code is never a literal True."""
    for folder in ("pipeline", "stages", "bench", "experiments"):
        for path, call in _calls(ROOT / folder):
            name = ast.unparse(call.func)
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") or name == "load":  # `load` alone: from torch import load
                assert keywords.get("weights_only") == "True", f"{path}:{call.lineno}: {name} without weights_only=True"
            assert name not in ("pickle.load", "pickle.loads"), f"{path}:{call.lineno}: pickle"
            assert keywords.get("trust_remote_code") != "True", f"{path}:{call.lineno}: trust_remote_code=True"
    ledger("security", "static scan: torch.load weights_only, no pickle, no literal trust_remote_code", "checked")


def test_trust_remote_code_follows_the_config(monkeypatch, ledger):
    """The loaders pass the config's value through to transformers: False unless the config says true."""
    import transformers

    from pipeline.backbone import load_backbone, load_tokenizer
    from pipeline.config import ModelConfig

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    model = ModelConfig(backbone=str(BACKBONE), num_layers=1)
    load_tokenizer(model)
    load_backbone(model)
    assert seen and all(value is False for value in seen), seen
    ledger("security", "trust_remote_code is False unless the config asks", "checked")


def test_pickled_weights_are_not_loaded(tmp_path, ledger):
    """A backbone folder with only a pickled checkpoint is refused; so is a pickled DeepSpeed file
    carrying code (the checkpoint engine loads with weights_only=True)."""
    import torch

    from pipeline.backbone import load_backbone
    from pipeline.config import ModelConfig
    from pipeline.errors import InputError

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(BACKBONE / "config.json", folder / "config.json")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="has no .safetensors weights"):
        load_backbone(ModelConfig(backbone=str(folder)))

    class Payload:  # unpickling this would run a shell command
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    bad = tmp_path / "mp_rank_00_model_states.pt"
    bad.write_bytes(pickle.dumps({"module": Payload()}))
    engine = weights_only_checkpoint_engine(None)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(bad), map_location="cpu")
    assert not (tmp_path / "pwned").exists()
    ledger("security", "pickled backbone weights and a code-carrying checkpoint are refused", "checked")


def test_mlflow_ui_binds_localhost_by_default(ledger):
    out = subprocess.run(["make", "-n", "mlflow-ui"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "--host 127.0.0.1" in out, out
    ledger("security", "make mlflow-ui binds 127.0.0.1 by default (the socket is checked in test_mlflow_ui)", "checked")
