"""Load the frozen backbone's tokenizer (and, for later stages, its weights) and fingerprint them.

The same code serves the embedded default (a local folder) and a cluster user's hub model name.
Remote code runs only when the config says `model.trust_remote_code: true`.
"""
from __future__ import annotations

import hashlib
import json

from pipeline.config import ModelConfig
from pipeline.errors import InputError


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    source = model.tokenizer or model.backbone
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=model.revision or None, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        field = "model.tokenizer" if model.tokenizer else "model.backbone"
        raise InputError(f"{field}: cannot load a tokenizer from {source!r} ({str(e).splitlines()[0]})") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids: vocabulary, merges, normalisation, special tokens."""
    if getattr(tokenizer, "is_fast", False):
        body = json.loads(tokenizer.backend_tokenizer.to_str())
        body.pop("truncation", None), body.pop("padding", None)  # call-time settings, not identity
    else:
        body = sorted(tokenizer.get_vocab().items())
    identity = {
        "tokenizer": body,
        "special": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
