"""The one place that knows how a Hugging Face decoder-only LM runs, layer by layer.

Balcony branches off the backbone between layers, so it cannot call the model's forward as a whole:
BalconyModel, the self-speculative decoder, the teacher stage and the evaluation run the layers
themselves, and `Decoder` gives each layer what the model's own forward would give it:

- the embeddings, scaled as the model scales them (Gemma inside its embedding module, Granite by
  `config.embedding_multiplier`);
- per layer type (`config.layer_types`: full, sliding or chunked attention) the attention mask,
  made by transformers' own mask functions, and the rotary position embeddings (one rotary module
  for every layer, or, as in Gemma 3, one called per layer type for local and global RoPE);
- the final norm, and the head: `lm_head`, then Granite's `logits_scaling` and Gemma's
  `final_logit_softcapping`.

A backbone loaded tensor-parallel (`model.tensor_parallel`) runs the same way: its layers are split
across a group of ranks by transformers, which all call them on the same input. What is trained or
run on one rank's own data (the exits, the head under them) is `replicated`: a plain copy, whole.

What each family needs is read from its modules and config, not from a list of families; the
family matrix in tests/test_families.py checks every path against the model's own forward.
Models without this layout (encoder-decoders, multimodal wrappers, no rotary module) are refused
at load with what is missing.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.errors import InputError

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


def text_decoder(backbone):
    """A multimodal causal LM (e.g. Gemma 3 4B+: Gemma3ForConditionalGeneration) as the causal LM of
    its text model alone, sharing its weights (the vision tower is dropped); any other model as is.
    Refused, with advice, when transformers has no causal-LM class for the text model."""
    inner = getattr(backbone, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(backbone, "lm_head"):
        return backbone
    from transformers import AutoModelForCausalLM

    text_config = backbone.config.get_text_config()
    try:
        with torch.device("meta"):  # no memory for weights that are replaced next
            text_lm = AutoModelForCausalLM.from_config(text_config)
    except ValueError:
        text_lm = None
    if text_lm is None or type(text_lm.model) is not type(inner.language_model):
        raise InputError(f"model.backbone: {type(backbone).__name__} is multimodal and its text model "
                         f"{type(inner.language_model).__name__} has no causal-LM class in transformers; give the "
                         "checkpoint of a text-only decoder")
    text_lm.model, text_lm.lm_head = inner.language_model, backbone.lm_head
    return text_lm.eval()


def check_supported(backbone) -> None:
    """Refuse, naming the model class and what is missing, anything the Decoder cannot run."""
    name = type(backbone).__name__
    config = getattr(backbone, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"model.backbone: {name} is an encoder-decoder model; Balcony needs a decoder-only LM")
    inner = getattr(backbone, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [f"model.{n}" for n in needed if not hasattr(inner, n)] + ([] if hasattr(backbone, "lm_head") else ["lm_head"])
    if missing:
        raise InputError(f"model.backbone: {name} is not a supported decoder-only LM: it has no "
                         f"{', '.join(missing)} (Balcony runs model.embed_tokens, model.layers with a shared "
                         "model.rotary_emb, model.norm and lm_head)")
    types = set(layer_types(config))
    unknown = types - set(_mask_functions())
    if unknown:
        raise InputError(f"model.backbone: {name} has layer types {sorted(unknown)} that Balcony does not know "
                         f"(known: {sorted(_mask_functions())})")


def keep_layers(config, indices) -> None:
    """Make `config` (in place) that of a model of the given layers of its own, in that order:
    num_hidden_layers and every per-layer setting (layer_types, SmolLM3's no_rope_layers, ...) cut to
    match, so that transformers builds, loads and saves such a model as one of its own."""
    indices = list(indices)
    layers = config.num_hidden_layers
    config.num_hidden_layers = len(indices)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == layers:
            setattr(config, key, [value[i] for i in indices])


def layer_types(config) -> list[str]:
    """The attention type of each layer: config.layer_types, else what transformers' KV cache infers
    without them: sliding for every layer when the config has a sliding window (Mistral), chunked
    with an attention chunk size, else full attention."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    if getattr(config, "sliding_window", None) is not None:
        return [SLIDING] * config.num_hidden_layers
    if getattr(config, "attention_chunk_size", None) is not None:
        return [CHUNKED] * config.num_hidden_layers
    return [FULL] * config.num_hidden_layers


def _mask_functions() -> dict:
    from transformers.masking_utils import (create_causal_mask, create_chunked_causal_mask,
                                            create_sliding_window_causal_mask)

    return {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask, CHUNKED: create_chunked_causal_mask}


def replicated(module: nn.Module) -> nn.Module:
    """A copy of `module` that runs on one rank alone: a tensor-parallel module's weight slices gathered
    whole (every rank of its group must call this) and its communicating forward dropped; any other
    module deep-copied."""
    from torch.distributed.tensor import DTensor

    whole = {id(p): nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)  # deepcopy's memo: used
             for p in module.parameters() if isinstance(p, DTensor)}                # in place of the slices
    clone = copy.deepcopy(module, whole)
    for part in clone.modules():
        part.__dict__.pop("forward", None)  # transformers' tensor parallelism replaces forward per instance
    return clone


def tensor_parallel_group(module: nn.Module):
    """The process group a tensor-parallel module is split across; None when it is whole."""
    from torch.distributed.tensor import DTensor

    for parameter in module.parameters():
        if isinstance(parameter, DTensor):
            return parameter.device_mesh.get_group()
    return None


def whole_head(backbone) -> nn.Module:
    """The LM head, whole on every rank. Split, it would gather each rank's logits for the inputs of every
    rank of its group: a rank scoring positions of its own (an exit's loss) needs it whole, ~V x d more
    bytes per rank, made once per backbone."""
    if tensor_parallel_group(backbone.lm_head) is None:
        return backbone.lm_head
    if "_whole_head" not in backbone.__dict__:  # a plain attribute: not a submodule of the backbone
        object.__setattr__(backbone, "_whole_head", replicated(backbone.lm_head))
    return backbone.__dict__["_whole_head"]


class Decoder:
    """A loaded HF causal LM seen as embeddings -> layers -> norm -> head."""

    def __init__(self, backbone):
        check_supported(backbone)
        self.backbone, self.inner, self.config = backbone, backbone.model, backbone.config
        self.types = layer_types(self.config)
        rotary = inspect.signature(self.inner.rotary_emb.forward).parameters
        self._rotary_per_type = "layer_type" in rotary  # Gemma 3: local and global RoPE from one module
        self.tensor_parallel = tensor_parallel_group(backbone)
        self.head = whole_head(backbone)

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def num_layers(self) -> int:
        return len(self.inner.layers)

    @property
    def norm(self) -> nn.Module:
        return self.inner.norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.inner.embed_tokens(input_ids)
        scale = getattr(self.config, "embedding_multiplier", None)  # Granite scales in the model's forward
        return hidden * scale if scale is not None else hidden

    def low_precision_rotary(self) -> list[str]:
        """Rotary frequency buffers that are not fp32. DeepSpeed 0.16 to 0.19.1 casts them to bf16 with
        the model: a silent position error that grows with the sequence length."""
        return [name for name, buffer in self.inner.rotary_emb.named_buffers()
                if buffer.is_floating_point() and buffer.dtype != torch.float32]

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own forward up to its final norm (no cache): the full model's normed hidden states."""
        return self.inner(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on normed hidden states, with the model's own output scaling and softcapping."""
        logits = self.head(hidden)
        scaling = getattr(self.config, "logits_scaling", None)  # Granite
        if scaling is not None:
            logits = logits / scaling
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2 / 3
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def layer_arguments(self, hidden: torch.Tensor, positions: torch.Tensor, types: set[str], cache=None,
                        slot: int | None = None, config=None, attention_mask: torch.Tensor | None = None) -> dict[str, dict]:
        """For each layer type in `types`, the keyword arguments a layer of that type gets from the
        model's own forward for `hidden` at `positions`. With a KV cache, the mask is made for the
        cache's layer `slot` (whose length may differ from other slots', as in speculative decoding);
        `config` is the one the cache was made from, when it has more layers than the model;
        `attention_mask` [B, cache columns + queries], 0 at padding, as HF generate's."""
        masks = _mask_functions()
        shared_rotary = None if self._rotary_per_type else self.inner.rotary_emb(hidden, positions)
        out = {}
        for kind in types:
            mask = masks[kind](config=config or self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                               position_ids=positions, **({"layer_idx": slot} if slot is not None else {}))
            rotary = self.inner.rotary_emb(hidden, positions, kind) if self._rotary_per_type else shared_rotary
            out[kind] = {"attention_mask": mask, "position_ids": positions, "position_embeddings": rotary,
                         **({"cache": cache, "use_cache": True} if cache is not None else {})}
        return out

    def with_top(self, depth: int, layer: nn.Module, norm: nn.Module, source: int):
        """An HF causal LM of the same class running layers[:depth], then `layer` (a copy of layers[source],
        as layer `depth`) and `norm` as its final norm; every weight shared, nothing copied. HF's own
        forward and generate() then run it: KV cache, sampling, padding, softcapping. Its config has
        depth + 1 layers and every per-layer setting (layer_types, SmolLM3's no_rope_layers, ...) cut
        to match, the last one from `source`: saved, it is a checkpoint plain transformers loads."""
        config = copy.deepcopy(self.config)
        keep_layers(config, [*range(depth), source])
        inner = copy.copy(self.inner)
        inner._modules = dict(inner._modules)
        inner.layers = nn.ModuleList([*self.layers[:depth], layer])
        inner.norm, inner.config = norm, config
        outer = copy.copy(self.backbone)
        outer._modules = dict(outer._modules)
        outer.model, outer.config = inner, config
        return outer

    def cache(self, extra_types: list[str]):
        """A KV cache for the model's layers plus one slot per extra layer (of the given types),
        whose sliding-window slots keep what a later crop may roll back (`realign`). Returns the cache
        and the config it was made from (for the masks of its slots: `layer_arguments`)."""
        from transformers import DynamicCache

        config = copy.deepcopy(self.config)
        config.layer_types = [*self.types, *extra_types]
        config.num_hidden_layers = len(config.layer_types)
        cache = DynamicCache(config=config)
        cache.activate_past_recording()
        return cache, config

    @staticmethod
    def realign(cache, shift: torch.Tensor, columns: int) -> None:
        """Every slot of `cache` cut to `columns` columns, each batch row first shifted right by shift[row]
        columns (what it vacates holds copies a padding mask must hide). Keys are stored rotated, so a
        shift changes nothing they mean; shifting before the crop lets a sliding-window slot, which holds
        its whole window plus the uncropped positions, keep the window the row needs."""
        for layer in cache.layers:
            if not layer.is_initialized:
                continue
            if int(shift.max()):
                index = (torch.arange(layer.keys.shape[-2], device=shift.device) - shift[:, None]).clamp_min(0)
                index = index[:, None, :, None].expand_as(layer.keys)
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
            layer.crop(-(layer.get_seq_length() - columns))  # a sliding slot also goes back to its window


def assign_cache_slot(layer: nn.Module, slot: int) -> None:
    """Make a decoder layer read and write KV-cache slot `slot` (HF attention keeps it as layer_idx)."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = slot


@contextmanager
def cache_slot(layer: nn.Module, slot: int):
    """A decoder layer on another KV-cache slot for the duration of the block."""
    owners = [m for m in layer.modules() if hasattr(m, "layer_idx")]
    before = [m.layer_idx for m in owners]
    assign_cache_slot(layer, slot)
    try:
        yield
    finally:
        for m, index in zip(owners, before):
            m.layer_idx = index
