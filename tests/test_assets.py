"""The embedded default: a real backbone converted from the packaged GGUF, and the packaged corpus."""
import json

import pytest

from conftest import ASSETS, BACKBONE, CORPUS


def test_corpus_has_every_collection(assets):
    counts = {p.stem: sum(1 for _ in p.open()) for p in sorted(CORPUS.glob("*.jsonl"))}
    assert set(counts) == {"austen", "bible", "milton", "shakespeare", "python-docs", "fortunes"}
    assert counts["bible"] == 1189  # one document per chapter of the KJV
    first = json.loads((CORPUS / "austen.jsonl").open().readline())
    assert first["id"].startswith("austen/") and "Jane Austen" in first["text"]
    tutorial = [json.loads(line) for line in (CORPUS / "python-docs.jsonl").open() if '"python-docs/tutorial/' in line]
    assert tutorial and any("def " in doc["text"] for doc in tutorial)
    total = sum(p.stat().st_size for p in CORPUS.glob("*.jsonl"))
    assert 24e6 < total < 30e6


def test_out_of_domain_text_is_apart_from_the_corpus(assets):
    """The evaluation text (Git's documentation) is in no training collection."""
    [eval_file] = (ASSETS / "eval").glob("*.jsonl")
    docs = [json.loads(line) for line in eval_file.open()]
    assert eval_file.name == "git-docs.jsonl" and len(docs) > 300 and all(d["id"].startswith("git-docs/") for d in docs)
    corpus = "".join(p.read_text() for p in CORPUS.glob("*.jsonl"))
    assert "git-rebase" in "".join(d["text"] for d in docs) and docs[0]["text"][:200] not in corpus


def test_second_build_verifies_checksums(assets, tmp_path):
    from embedded.assets import STAMP, AssetError, _is_intact

    assert _is_intact(CORPUS) and _is_intact(BACKBONE)
    copy = tmp_path / "corpus"
    copy.mkdir()
    for p in CORPUS.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with open(copy / "milton.jsonl", "a") as f:
        f.write("tampered\n")
    with pytest.raises(AssetError, match="differ from the checksums in " + STAMP):
        _is_intact(copy)


def test_backbone_is_a_working_smollm2(assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BACKBONE)
    model = AutoModelForCausalLM.from_pretrained(BACKBONE, dtype=torch.float32)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_key_value_heads) == (30, 576, 49152, 3)
    assert (BACKBONE / "model.safetensors").exists() and not list(BACKBONE.glob("*.bin"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
