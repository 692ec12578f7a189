"""Load the frozen backbone and its tokenizer, and fingerprint both.

The same code serves the embedded default (a local folder) and a cluster user's hub model name.
Remote code runs only when the config says `model.trust_remote_code: true`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.decoder import check_supported, keep_layers, text_decoder
from pipeline.errors import ConfigError, InputError
from pipeline.shards import atomic_write, file_sha256


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


# ---------------------------------------------------------------- weights

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                         "_attn_implementation", "_attn_implementation_autoset", "attn_implementation"}


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model.dtype)


def weights_dir(model: ModelConfig) -> Path:
    """The local folder holding the backbone's files (a hub name resolves to its cached snapshot)."""
    if Path(model.backbone).is_dir():
        return Path(model.backbone)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.backbone, revision=model.revision or None,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        raise InputError(f"model.backbone: {model.backbone!r} is not a local folder and cannot be fetched ({e})") from None


def load_backbone(model: ModelConfig, device: torch.device | str = "cpu"):
    """The frozen causal LM: safetensors weights only, eval mode, no gradients. With
    `model.tensor_parallel` N > 1, split across each group of N consecutive ranks by the model's own
    tensor-parallel plan (transformers'), each rank reading only its slices of the weight files."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    device = torch.device(device)
    folder = weights_dir(model)
    if not list(folder.glob("*.safetensors")):
        raise InputError(f"model.backbone: {folder} has no .safetensors weights (pickled checkpoints are not loaded)")
    overrides = {"config": truncated_config(model, folder)} if model.num_layers else {}
    verbosity = transformers_logging.get_verbosity()
    if model.num_layers:  # the dropped layers' weights are reported as unexpected: that is the point
        transformers_logging.set_verbosity_error()
    try:
        with tensor_parallel_loading(model, folder, device) as parallel:
            backbone = AutoModelForCausalLM.from_pretrained(
                folder, dtype=resolve_dtype(model, device), use_safetensors=True,
                trust_remote_code=model.trust_remote_code, **parallel, **overrides,
            )
    except ConfigError:  # model.tensor_parallel's, as it is
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"model.backbone: cannot load {folder} ({str(e).splitlines()[0]})") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    backbone = text_decoder(backbone)  # a multimodal checkpoint: its text model
    check_supported(backbone)  # before any work: a model Balcony cannot run layer by layer is refused here
    backbone.requires_grad_(False)
    return backbone.eval().to(device)


def truncated_config(model: ModelConfig, folder: Path):
    """The backbone's config cut to its first `model.num_layers` layers (fast tests)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    keep_layers(config.get_text_config(), range(model.num_layers))
    return config


def check_tensor_parallel(config, size: int, where: str) -> None:
    """A tensor-parallel rank holds whole attention heads: N must divide the query and KV heads."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if size > 1 and (heads is None or heads % size or kv_heads % size):
        raise ConfigError(f"model.tensor_parallel: {size} does not divide the {heads} attention heads and {kv_heads} "
                          f"KV heads of {where}; choose a divisor of {math.gcd(heads or 1, kv_heads or 1)}")


@contextmanager
def tensor_parallel_loading(model: ModelConfig, folder: Path, device: torch.device):
    """from_pretrained's arguments for `model.tensor_parallel` (none for 1).

    transformers builds its device mesh over the whole world; here the world may hold several groups
    of N ranks (the exits' data parallelism), and each group splits its own copy of the backbone. So
    the mesh it would build is replaced by one whose tensor-parallel axis is this rank's group (the
    other axes, which transformers would apply FSDP over, have size 1): transformers 5.24's
    `initialize_distributed_mesh`, which setup.py pins."""
    size = model.tensor_parallel
    if size == 1:
        yield {}
        return
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig
    from transformers.distributed import mixin
    from transformers.distributed.utils import TransformersDeviceMesh

    check_tensor_parallel(AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code).get_text_config(),
                          size, folder / "config.json")
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % size:
        raise ConfigError(f"model.tensor_parallel: {size} does not divide the {world} ranks of this run: start a "
                          f"multiple of {size} processes (torchrun --nproc-per-node {size}, srun --ntasks-per-node {size})")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    groups = world // size
    dense = dist.init_device_mesh(device_type, (groups, 1, 1, 1, size),
                                  mesh_dim_names=("groups", "pp", "dp_replicate", "fsdp", "tp"))
    expert = dist.init_device_mesh(device_type, (groups, 1, 1, size, 1),
                                   mesh_dim_names=("groups", "pp", "dp_replicate", "efsdp", "ep"))
    meshes = TransformersDeviceMesh(dense[("pp", "dp_replicate", "fsdp", "tp")],
                                    expert[("pp", "dp_replicate", "efsdp", "ep")])
    original = mixin.initialize_distributed_mesh
    mixin.initialize_distributed_mesh = lambda config: (device, meshes)
    try:
        yield {"distributed_config": DistributedConfig(tp_size=size)}
    finally:
        mixin.initialize_distributed_mesh = original


def backbone_on_meta(model: ModelConfig):
    """The backbone's architecture without its weights (on the meta device): what a plan counts.
    Reads only config.json: a local folder, the hub cache, or the hub."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model.backbone, revision=model.revision or None,
                                            trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"model.backbone: cannot read the config.json of {model.backbone!r} ({str(e).splitlines()[0]}); "
                         "offline, point model.backbone at a folder holding it") from None
    if model.num_layers:
        keep_layers(config.get_text_config(), range(model.num_layers))
    with torch.device("meta"):
        backbone = text_decoder(AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code))
    check_supported(backbone)
    return backbone


def _file_sha256_cached(path: Path) -> str:
    """sha256 of a weight file, cached by (path, size, mtime): an 8B model is 16 GB to hash."""
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "balcony" / "sha256.json"
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key not in cache:
        cache[key] = file_sha256(path)
        atomic_write(cache_file, json.dumps(cache).encode(), shared=True)  # other processes may write it too
    return cache[key]


def backbone_fingerprint(model: ModelConfig, backbone) -> str:
    """Hash of the architecture (config, including any truncation) and of the weight files."""
    config = {k: v for k, v in backbone.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = {p.name: _file_sha256_cached(p) for p in sorted(weights_dir(model).glob("*.safetensors"))}
    identity = json.dumps({"config": config, "weights": weights}, sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
