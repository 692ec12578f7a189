"""Documents come through `datasets` streaming from local text, JSONL and parquet files."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.backbone import load_tokenizer
from pipeline.config import DataConfig, ModelConfig
from pipeline.corpus import stream_documents
from pipeline.errors import InputError

from conftest import BACKBONE


def _data(files, **kw):
    return DataConfig(**{"files": [str(f) for f in files], "budget_tokens": 1000, "shuffle_buffer": 0, **kw})


def test_plain_text_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.txt").write_text("Another file.\n")
    docs = list(stream_documents(_data([tmp_path / "*.txt"], source="text")))
    assert docs == ["First paragraph.\n\nSecond paragraph.\n", "Another file.\n"]
    docs = list(stream_documents(_data([tmp_path / "a.txt"], source="text", text_sample_by="paragraph")))
    assert len(docs) == 2


def test_parquet_and_custom_text_field(tmp_path):
    pq.write_table(pa.table({"body": ["x y", "z"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert list(stream_documents(_data([tmp_path / "c.parquet"], source="parquet", text_field="body"))) == ["x y", "z"]
    with pytest.raises(InputError, match="data.text_field: record 0 has no field 'text'"):
        list(stream_documents(_data([tmp_path / "c.parquet"], source="parquet")))


def test_seeded_shuffle_is_deterministic(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    runs = [list(stream_documents(_data([path], shuffle_buffer=50, seed=s))) for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2] and sorted(runs[0]) == sorted(runs[2])


def test_prompt_and_text_through_the_chat_template(tmp_path, assets):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "Write a line.", "text": "A line."}) + "\n")
    tokenizer = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    data = _data([path], chat_template=True, prompt_field="prompt")
    (doc,) = stream_documents(data, tokenizer)
    assert "<|im_start|>user\nWrite a line.<|im_end|>" in doc and "<|im_start|>assistant\nA line." in doc
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="data.chat_template: the tokenizer has no chat template"):
        list(stream_documents(data, tokenizer))
