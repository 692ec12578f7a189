"""The tokenize stage end to end, run as a user runs it: a subprocess per invocation."""
import json
import re

import pytest

from pipeline.backbone import load_tokenizer, tokenizer_fingerprint
from pipeline.config import load_config
from pipeline.corpus import plan_shards
from pipeline.errors import ShardError
from pipeline.shards import MANIFEST, read_manifest, read_shard
from pipeline.stage import owned_shards

from conftest import BACKBONE, CORPUS, ROOT, built_once, run_in_process, run_stage, tree_bytes

pytestmark = pytest.mark.integration  # runs the stages as processes

STAGE = "tokenize_corpus.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tracking_uri, assets):
    """One uninterrupted single-task run that the other tests compare against."""
    import yaml

    from conftest import small_config

    def build(folder):
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(small_config(folder / "run", tracking_uri)))
        return config, folder / "run" / "tokens", run_stage(STAGE, "--config", config)

    return built_once(tmp_path_factory, "tokenized", build)


def test_budget_manifest_and_noop_rerun(reference):
    config, tokens, proc = reference
    cfg = load_config(config)
    manifest = read_manifest(tokens, "tokenize", expect={"seq_len": 128})
    train = manifest["splits"]["train"]
    assert abs(train["tokens"] - cfg.data.train_token_count) < cfg.data.seq_len
    assert manifest["splits"]["heldout"]["tokens"] == 1024 and len(train["shards"]) == 4
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(load_tokenizer(cfg.model))
    assert manifest["config_hash"] == cfg.hash("data")
    for record in train["shards"] + manifest["splits"]["heldout"]["shards"]:
        for sample in read_shard(tokens, record):
            ids = sample["input_ids.npy"]
            assert ids.dtype.name == "int32" and ids.shape == (128,)
    before = {p: p.stat().st_mtime_ns for p in tokens.rglob("*")}
    again = run_stage(STAGE, "--config", config)
    assert "nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in tokens.rglob("*")} == before


def test_shards_hold_real_documents_joined_by_eos(reference):
    config, tokens, _ = reference
    tok = load_tokenizer(load_config(config).model)
    texts = [json.loads(line)["text"] for p in sorted((ROOT / "assets" / "corpus").glob("*.jsonl")) for line in p.open()]
    eos_seen = 0
    for record in read_manifest(tokens, "tokenize")["splits"]["train"]["shards"]:
        ids = [int(t) for s in read_shard(tokens, record) for t in s["input_ids.npy"]]
        eos_seen += ids.count(tok.eos_token_id)
        first = tok.decode(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids)
        assert any(text.startswith(first[:300]) for text in texts), first[:300]  # a shard starts a document
    assert eos_seen >= 2


def test_three_tasks_give_identical_bytes(reference, write_config, tmp_path):
    config, tokens, _ = reference
    split = write_config("split.yaml", run_dir=tmp_path / "split")
    # in this process: the task split is under test, not the command
    outputs = [run_in_process("tokenize", split, "--task-index", str(i), "--num-tasks", "3") for i in (2, 0, 1)]
    assert [code for code, _, _ in outputs] == [0, 0, 0], outputs[0][2][-3000:]
    assert "manifest is written when the other tasks finish" in outputs[0][1]
    assert "wrote" in outputs[-1][1]
    assert tree_bytes(tmp_path / "split" / "tokens") == tree_bytes(tokens)


def test_slurm_array_variables_pick_the_task(reference, write_config, tmp_path):
    config, tokens, _ = reference
    split = write_config("slurm.yaml", run_dir=tmp_path / "slurm")
    for task_id in (1, 2):  # an --array=1-2 job: SLURM_ARRAY_TASK_MIN is 1
        env = {**__import__("os").environ, "SLURM_ARRAY_TASK_ID": str(task_id),
               "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
        run_stage(STAGE, "--config", split, env=env)
    assert tree_bytes(tmp_path / "slurm" / "tokens") == tree_bytes(tokens)


def test_rerun_with_other_tokenizer_or_data_is_refused(reference, tmp_path):
    config, tokens, _ = reference
    before = tree_bytes(tokens)
    # another tokenizer: the same files plus one added token
    other = tmp_path / "other-tokenizer"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BACKBONE)
    tok.add_tokens(["<balcony>"])
    tok.save_pretrained(other)
    proc = run_stage(STAGE, "--config", config, f"model.tokenizer={other}", check=False)
    assert proc.returncode == 2
    assert "tokenizer_fingerprint=" in proc.stderr and "use another run.dir" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_stage(STAGE, "--config", config, "data.seed=7", check=False)
    assert proc.returncode == 2 and "config_hash=" in proc.stderr
    assert tree_bytes(tokens) == before
    # a consumer that expects the other tokenizer refuses these shards, naming the field
    with pytest.raises(ShardError, match="tokenizer_fingerprint is '[0-9a-f]+', expected '[0-9a-f]+'"):
        read_manifest(tokens, "tokenize", expect={"tokenizer_fingerprint": tokenizer_fingerprint(tok)})


def test_bad_config_starts_no_work(write_config, tmp_path):
    bad = write_config("bad.yaml", run_dir=tmp_path / "bad", data={"seq_len": "long"})
    proc = run_stage(STAGE, "--config", bad, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: data.seq_len: expected an int, got 'long'"
    missing = write_config("missing.yaml", run_dir=tmp_path / "bad", data={"files": [str(tmp_path / "none*.txt")]})
    proc = run_stage(STAGE, "--config", missing, check=False)
    assert proc.returncode == 2 and "data.files: no file matches" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_bad_record_is_one_line_naming_it_or_skipped_and_counted(write_config, tmp_path):
    from conftest import CORPUS

    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"text": "a whole record"}\n{"text": "cut o')
    files = [str(CORPUS / "*.jsonl"), str(cut)]
    config = write_config("cut.yaml", run_dir=tmp_path / "run", data={"files": files})
    proc = run_stage(STAGE, "--config", config, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: data.files: {cut}:2: not valid JSON at column 10: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    run_stage(STAGE, "--config", config, "data.on_bad_record=skip")
    assert json.loads((tmp_path / "run" / "tokens" / MANIFEST).read_text())["skipped_records"] == 1


def test_a_budget_the_files_cannot_fill_is_refused_before_any_work(write_config, tmp_path):
    """The scan estimates the files' tokens (characters at the sample's characters per token): a budget
    far beyond them is one line naming the key, exit 2, and no run directory."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"Document {i}: " + "a few plain words. " * 20}) + "\n"
                             for i in range(20)))
    config = write_config("small.yaml", run_dir=tmp_path / "run", data={"files": [str(small)]})
    refused_before_work(config, tmp_path / "run", r"error: data.train_tokens: the files hold about [\d,]+ tokens "
                        r"\([\d,]+ characters in 20 documents at [\d.]+ characters per token, measured on 16 of them\), "
                        r"fewer than the 9,216 that data.train_tokens and data.heldout_tokens ask for")


def refused_before_work(config, run_dir, error: str) -> None:
    """The stage exits 2 with one line matching `error`, and has created no run directory."""
    proc = run_stage(STAGE, "--config", config, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.match(error, proc.stderr), proc.stderr
    assert not run_dir.exists()


def test_stage_logs_an_mlflow_run(reference):
    import mlflow

    config, tokens, _ = reference
    client = mlflow.MlflowClient(load_config(config).run.tracking_uri)  # the store of the worker that ran it
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'tokenize' and tags.task = '0/1'")
    run = next(r for r in runs if r.data.tags["run_dir"] == str(tokens.parent))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["tokens"] == 8192 and run.data.metrics["tokens_per_s"] > 0
    assert run.data.params["data.seq_len"] == "128"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "manifest.json" in artifacts
    manifest = json.loads((tokens / MANIFEST).read_text())
    assert run.data.tags["config_hash"] == manifest["config_hash"]


def _dataset_folder(folder, documents: int):
    """A dataset as the hub serves one (parquet files + a card whose dataset_info counts the documents),
    in a local folder: `data.source: hub` reads it through the same `datasets` calls, offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    texts = [f"Document {i}: " + "plain words about nothing in particular. " * 30 for i in range(documents)]
    half = documents // 2
    for index, part in enumerate((texts[:half], texts[half:])):
        pq.write_table(pa.table({"text": part}), folder / "data" / f"train-0000{index}-of-00002.parquet")
    (folder / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  splits:\n  - name: train\n"
        f"    num_bytes: {documents * 300}\n    num_examples: {documents}\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n---\n")
    return folder


def test_a_hub_dataset_is_checked_against_its_metadata(write_config, tmp_path):
    """A hub dataset's budget is checked before any work against the documents its card counts, at the
    tokens per document of its first ones: over it, one line and no run directory; within it, shards."""
    dataset = _dataset_folder(tmp_path / "dataset", documents=200)  # ~200 x 220 tokens
    hub = {"source": "hub", "hub_name": str(dataset), "files": []}
    config = write_config("hub.yaml", run_dir=tmp_path / "run", data={**hub, "train_tokens": 200_000})
    refused_before_work(config, tmp_path / "run", rf"error: data.train_tokens: {re.escape(str(dataset))} \(train\) "
                        r"holds about [\d,]+ tokens \(200 documents by its metadata at [\d,]+ tokens each, measured on "
                        r"the first 200\), fewer than the 201,024 that data.train_tokens and data.heldout_tokens ask for")
    run_stage(STAGE, "--config", config, "data.train_tokens=8192")
    assert json.loads((tmp_path / "run" / "tokens" / MANIFEST).read_text())["splits"]["train"]["tokens"] == 8192


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, tracking_uri, assets):
    """The six corpus files in three read groups of two (a copy, so a test may spoil one), tokenized
    by one task: (folder of the copy, data section, output of the single run)."""
    import shutil

    import yaml

    from conftest import small_config

    def build(folder):
        for path in CORPUS.glob("*.jsonl"):
            shutil.copy(path, folder / path.name)
        data = {"files": [str(folder / "*.jsonl")], "read_groups": 3, "train_tokens": 16384}
        config = folder / "one.yaml"
        config.write_text(yaml.safe_dump(small_config(folder / "one", tracking_uri, data=data)))
        run_stage(STAGE, "--config", config)
        return folder, data, folder / "one" / "tokens"

    return built_once(tmp_path_factory, "grouped", build)


def test_read_groups_give_the_same_bytes_for_any_task_count(grouped, write_config, tmp_path):
    folder, data, one = grouped
    config = write_config("three.yaml", run_dir=tmp_path / "three", data=data)
    for i in (2, 0, 1):  # in this process: the task split is under test, not the command
        code, _, stderr = run_in_process("tokenize", config, "--task-index", str(i), "--num-tasks", "3")
        assert code == 0, stderr[-3000:]
    assert tree_bytes(tmp_path / "three" / "tokens") == tree_bytes(one)
    specs = plan_shards(load_config(config).data)
    assert [s.group for s in specs if s.split == "train"] == sorted(s.group for s in specs if s.split == "train")
    assert {s.group for s in specs} == {0, 1, 2}  # shares by size: python-docs + shakespeare get the most


def test_a_task_reads_only_the_groups_of_its_shards(grouped, write_config, tmp_path):
    """A bad record in a file of group 2 stops only the task whose block of shards comes from group 2."""
    folder, data, _ = grouped
    spoiled = tmp_path / "spoiled"
    spoiled.mkdir()
    for path in folder.glob("*.jsonl"):
        (spoiled / path.name).write_bytes(path.read_bytes())
    last = spoiled / "shakespeare.jsonl"  # the second file of group 2
    body = last.read_bytes()
    cut = body.rindex(b"\n", 0, len(body) - 1) + 1
    last.write_bytes(body[:cut] + b"x" + body[cut + 1:])  # the last line is no longer JSON; the size is kept
    config = write_config("spoiled.yaml", run_dir=tmp_path / "run", data={**data, "files": [str(spoiled / "*.jsonl")]})
    specs = plan_shards(load_config(config).data)
    blocks = [{s.group for s in owned_shards(specs, i, 3)} for i in range(3)]
    assert 2 not in blocks[0] and 2 in blocks[2], blocks
    assert run_in_process("tokenize", config, "--task-index", "0", "--num-tasks", "3")[0] == 0
    code, _, stderr = run_in_process("tokenize", config, "--task-index", "2", "--num-tasks", "3")
    assert code == 2 and stderr.startswith(f"error: data.files: {last}:"), stderr


def test_a_killed_task_keeps_the_groups_it_packed(grouped, write_config, tmp_path):
    """Killed while packing group 1, a task has kept group 0's shards; the rerun writes the rest, and
    the bytes are those of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    _, data, one = grouped
    config = write_config("killed.yaml", run_dir=tmp_path / "run", data=data)
    out = tmp_path / "run" / "tokens"
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / STAGE), "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / ".parts" / "scan-group-0001.json").exists():  # group 0 is packed: group 1 begins
        assert proc.poll() is None, "tokenize ended before packing its second group"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    specs = plan_shards(load_config(config).data)
    group0 = sum(s.group == 0 for s in specs)
    rerun = run_stage(STAGE, "--config", config)
    assert f"task 0/1: {len(specs) - group0} of {len(specs)} shards to write" in rerun.stdout, rerun.stdout
    assert tree_bytes(out) == tree_bytes(one)
