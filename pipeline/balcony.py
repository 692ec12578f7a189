"""BalconyModel: a frozen decoder LM plus trainable exits at chosen depths.

The exit at depth k reads the hidden state after layers[:k] and applies

    one decoder layer (same class and config as the backbone's)
    -> its own norm
    -> the backbone's frozen, shared LM head.

How the exit starts (`exits.init`):
- `last_layer` (the paper's): a copy of the LAST layer, the norm from layers[k].input_layernorm
  (as the authors' code does);
- `next_layer`: a copy of layers[k], the layer that follows the exit in the backbone, and of the
  final norm: before training, exit k is exactly the logit lens at depth k+1.

`exits.kind: tuned_lens` replaces the decoder layer by an affine map h + Ah + b (A, b zero at
init) into a frozen copy of the final norm: the tuned lens (Belrose et al., 2023), the cheap probe
a Balcony exit must beat, trained by the same stage on the same targets.

One pass through the backbone prefix serves every exit: the forward branches off at each depth
and, when the full model's output is not needed, stops at the deepest exit.

How the backbone runs layer by layer (masks and position embeddings per layer type, scaled
embeddings, softcapped logits) is pipeline/decoder.py's business; the families it supports are
listed in the README. An exit layer gets the arguments of the layer it was copied from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.decoder import Decoder, assign_cache_slot, replicated
from pipeline.errors import ConfigError, InputError
from pipeline.shards import FORMAT_VERSION, atomic_write, check_format_version, file_sha256
WEIGHTS, CONFIG = "exits.safetensors", "balcony_config.json"


def check_depths(depths: list[int], num_layers: int) -> None:
    if not depths:
        raise ConfigError("exits.depths: at least one exit depth is needed")
    for depth in depths:
        if not 1 <= depth < num_layers:
            raise ConfigError(f"exits.depths: {depth} is out of range: an exit depth must be in [1, {num_layers - 1}] "
                              f"for a backbone of {num_layers} layers")


KINDS = ("balcony", "tuned_lens")
INITS = ("last_layer", "next_layer")


class Exit(nn.Module):
    def __init__(self, layer: nn.Module, norm: nn.Module, source: int, layer_type: str):
        super().__init__()
        self.layer, self.norm = layer, norm
        self.source = source  # the backbone layer it was copied from: its per-layer settings are the exit's
        self.layer_type = layer_type  # that layer's attention type (full, sliding, ...)


class TunedLens(nn.Module):
    """The tuned lens's translator: h + A h + b, zero at init (so it starts as the logit lens).
    Takes a decoder layer's keyword arguments and ignores them: it sees one position at a time."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, **_) -> torch.Tensor:
        return hidden + self.proj(hidden)


def make_exit(decoder: Decoder, depth: int, kind: str, init: str) -> Exit:
    source = depth if init == "next_layer" else decoder.num_layers - 1  # the layer an exit is a copy of
    if kind == "tuned_lens":
        norm = replicated(decoder.norm).requires_grad_(False)  # the lens reads through the model's own norm
        translator = TunedLens(decoder.config.hidden_size).to(decoder.norm.weight.dtype)
        return Exit(translator.requires_grad_(True), norm, source, decoder.types[source])
    if init == "next_layer":
        norm = decoder.norm
    else:
        norm = getattr(decoder.layers[depth], "input_layernorm", None)
        if norm is None:  # e.g. OLMo 2's layers norm after attention, not before: start from the final norm
            norm = decoder.norm
    exit_ = Exit(replicated(decoder.layers[source]), replicated(norm), source, decoder.types[source])
    return exit_.requires_grad_(True)


def read_exits_config(exits_dir: Path) -> dict:
    """balcony_config.json of exported exits (depths, kind, backbone fingerprint, training), checked."""
    path = Path(exits_dir) / CONFIG
    if not path.exists():
        raise InputError(f"{path} not found: run the train-exits stage first")
    meta = json.loads(path.read_text())
    check_format_version(path, meta)
    return meta


def recorded_evaluation(metrics_path: Path, exits_dir: Path) -> dict | None:
    """The evaluate stage's metrics.json if it scored these very exits (the same weights file), else None."""
    if not Path(metrics_path).exists():
        return None
    metrics = json.loads(Path(metrics_path).read_text())
    check_format_version(Path(metrics_path), metrics)
    return metrics if metrics.get("exits_sha256") == file_sha256(Path(exits_dir) / WEIGHTS) else None


def gather_group_inputs(input_ids: torch.Tensor, group) -> tuple[torch.Tensor, slice]:
    """Every rank's [B, T] inputs of a tensor-parallel group stacked, and where this rank's are in them."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces = [torch.empty_like(input_ids) for _ in range(size)]
    dist.all_gather(pieces, input_ids.contiguous(), group=group)
    batch = input_ids.shape[0]
    return torch.cat(pieces), slice(rank * batch, (rank + 1) * batch)


class BalconyModel(nn.Module):
    def __init__(self, backbone, depths: list[int], kind: str = "balcony", init: str = "last_layer",
                 inputs_per_rank: bool = False):
        """`inputs_per_rank`: with a tensor-parallel backbone, each rank brings inputs of its own (training:
        the prefix runs on its group's stacked); else every rank of a group brings the same (inference)."""
        super().__init__()
        self.inputs_per_rank = inputs_per_rank
        self.decoder = Decoder(backbone)
        check_depths(depths, self.decoder.num_layers)
        if kind not in KINDS or init not in INITS:
            raise ConfigError(f"exits: kind must be one of {KINDS} and init one of {INITS}, got {kind!r}, {init!r}")
        backbone.requires_grad_(False)
        self.depths, self.kind, self.init = sorted(depths), kind, init
        if self.decoder.tensor_parallel is None:
            self.backbone = backbone
        else:  # not a submodule: DeepSpeed, which sees submodules, would broadcast rank 0's slices to every rank
            object.__setattr__(self, "backbone", backbone)
        self.meta: dict = {}  # balcony_config.json of exits loaded by from_pretrained (e.g. their objective)
        self.exits = nn.ModuleDict({str(k): make_exit(self.decoder, k, kind, init) for k in self.depths})
        for k, exit_ in self.exits.items():  # in a depth-k model the exit layer is layer k: its KV cache slot
            assign_cache_slot(exit_.layer, int(k))

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen head (with the backbone's own logit scaling or softcapping) on normed hidden states."""
        return self.decoder.logits(hidden)

    def forward(self, input_ids: torch.Tensor, full: bool = False,
                taps: dict | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Normed hidden states of every exit ({depth: [B, T, d]}), and the full model's final
        normed hidden state when `full` (else the backbone stops at the deepest exit). `taps`, if
        given, receives the backbone's own hidden state at each exit depth (for the logit lens).

        The frozen prefix runs without autograd; only the exits build a graph.
        Split tensor-parallel with `inputs_per_rank`, the prefix runs on the inputs of every rank of
        the group at once, and each rank's exits on its own (as in plain data parallelism).
        """
        decoder = self.decoder
        own = None
        if decoder.tensor_parallel is not None and self.inputs_per_rank:
            input_ids, own = gather_group_inputs(input_ids, decoder.tensor_parallel)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        stop = self.num_layers if full else self.depths[-1]
        with torch.no_grad():
            hidden = decoder.embed(input_ids)
            types = set(decoder.types[:stop]) | {exit_.layer_type for exit_ in self.exits.values()}
            arguments = decoder.layer_arguments(hidden, positions, types)
        exits, final = {}, None
        for index, layer in enumerate(decoder.layers[:stop]):
            with torch.no_grad():
                hidden = layer(hidden, **arguments[decoder.types[index]])
            depth = index + 1
            if str(depth) in self.exits:
                mine = hidden if own is None else hidden[own]
                if taps is not None:
                    taps[depth] = mine
                exit_ = self.exits[str(depth)]
                own_arguments = arguments[exit_.layer_type]  # masks and rotary broadcast over the batch
                exits[depth] = exit_.norm(exit_.layer(mine, **own_arguments))
        if full:
            with torch.no_grad():
                final = decoder.norm(hidden if own is None else hidden[own])
        return exits, final

    # ------------------------------------------------------------ inference

    def choose_exit(self, budget: float) -> int | None:
        """The deepest exit whose cost (k+1)/L fits `budget` in (0, 1]; None (the full model) at 1."""
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if budget >= 1:
            return None
        fitting = [k for k in self.depths if (k + 1) / self.num_layers <= budget]
        if not fitting:
            cheapest = (self.depths[0] + 1) / self.num_layers
            raise ValueError(f"budget {budget} is below the cheapest exit's cost {cheapest:.3f} (exit {self.depths[0]})")
        return fitting[-1]

    def view(self, depth: int | None):
        """An HF causal LM that runs layers[:depth] + the exit at `depth`, sharing every weight.

        HF's own generate() then gives KV caching, sampling and padding for free; `None` is the
        backbone itself, so the full model is exactly HF's output.
        """
        if depth is None:
            return self.backbone
        if str(depth) not in self.exits:
            raise ValueError(f"no exit at depth {depth}; exits: {self.depths}")
        exit_ = self.exits[str(depth)]
        return self.decoder.with_top(depth, exit_.layer, exit_.norm, exit_.source)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, exit: int | None = None, budget: float | None = None,
                 speculative: bool = False, **kwargs):
        """HF generate() at one exit (`exit=k`), or at the deepest exit a compute `budget` allows.

        `speculative=True`: the full model's output (greedy, or sampled with HF's `do_sample`, `temperature`,
        `top_k`, `top_p`), drafted by exit `exit` and verified by the full model (pipeline/speculative.py);
        without `exit`, the exit and drafts the evaluate stage measured fastest (`speculative_choice`).
        Takes `attention_mask` (left padding), `max_new_tokens`, `eos_token_id`, `pad_token_id`,
        `max_draft`, `tau` and a torch `generator`; returns the token ids as HF generate does."""
        if exit is not None and budget is not None:
            raise ValueError("give exit or budget, not both")
        if speculative:
            if budget is not None:
                raise ValueError("speculative decoding gives the full model's output: give an exit to draft, not a budget")
            return self._speculative(input_ids, exit, **kwargs)
        depth = self.choose_exit(budget) if budget is not None else exit
        return self.view(depth).generate(input_ids, **kwargs)

    def _speculative(self, input_ids: torch.Tensor, exit: int | None, attention_mask=None, max_new_tokens=None,
                     do_sample=None, temperature=None, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
                     max_draft=None, tau=None, generator=None) -> torch.Tensor:
        from pipeline.speculative import DraftPolicy, Sampling, speculative_generate

        defaults = self.backbone.generation_config  # HF generate's defaults for this model
        choice = self.speculative_choice if exit is None or exit == self.speculative_choice["depth"] else {}
        depth = exit if exit is not None else self.speculative_choice["depth"]
        policy = DraftPolicy(max_draft if max_draft is not None else choice.get("max_draft", 4),
                             tau if tau is not None else choice.get("tau", 0.0))
        do_sample = defaults.do_sample if do_sample is None else do_sample
        sampling = Sampling(do_sample=bool(do_sample), temperature=temperature or defaults.temperature or 1.0,
                            top_k=defaults.top_k or 0 if top_k is None else top_k,
                            top_p=defaults.top_p or 1.0 if top_p is None else top_p) if do_sample else Sampling()
        eos = defaults.eos_token_id if eos_token_id is None else eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        out, _ = speculative_generate(self, input_ids, depth, max_new_tokens or defaults.max_new_tokens or 20, policy,
                                      sampling, attention_mask=attention_mask, eos_token_id=eos,
                                      pad_token_id=defaults.pad_token_id if pad_token_id is None else pad_token_id,
                                      generator=generator)
        return out

    @property
    def speculative_choice(self) -> dict:
        """The exit and draft policy generate(speculative=True) uses: the evaluate stage's measured choice
        (from_pretrained's `evaluation`), else the deepest exit with fixed drafts of 4."""
        return self.meta.get("speculative_choice") or {"depth": self.depths[-1], "max_draft": 4, "tau": 0.0}

    # ------------------------------------------------------------ export / import

    def exit_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{name}": p.detach().contiguous().cpu() for k, exit_ in self.exits.items()
                for name, p in exit_.state_dict().items()}

    def save_exits(self, folder: Path, backbone_fingerprint: str, extra: dict | None = None) -> None:
        """exits.safetensors, then balcony_config.json: each written atomically, the config last, so
        its presence marks a complete export."""
        from safetensors.torch import save

        atomic_write(Path(folder) / WEIGHTS, save(self.exit_state_dict()))
        meta = {"format_version": FORMAT_VERSION, "backbone_fingerprint": backbone_fingerprint,
                "depths": self.depths, "num_layers": self.num_layers, "kind": self.kind, "init": self.init,
                "exit_layer": type(next(iter(self.exits.values())).layer).__name__, **(extra or {})}
        atomic_write(Path(folder) / CONFIG, json.dumps(meta, indent=1).encode())

    @classmethod
    def from_pretrained(cls, backbone, exits_dir: Path, backbone_fingerprint: str | None = None,
                        depths: list[int] | None = None, evaluation: Path | None = None) -> "BalconyModel":
        """Backbone (a loaded HF model) + exported exits; refuses exits made for another backbone
        or, when `depths` is given, for another exit list. `evaluation`: the evaluate stage's
        metrics.json (RUN/eval/metrics.json), whose speculative choice generate(speculative=True) then
        uses; refused if it scored other exits."""
        exits_dir = Path(exits_dir)
        meta = read_exits_config(exits_dir)
        if backbone_fingerprint is not None and meta["backbone_fingerprint"] != backbone_fingerprint:
            raise InputError(f"{exits_dir / CONFIG}: backbone_fingerprint is {meta['backbone_fingerprint']!r}, "
                             f"this backbone's is {backbone_fingerprint!r}")
        if depths is not None and sorted(depths) != sorted(meta["depths"]):
            raise InputError(f"{exits_dir / CONFIG}: depths is {meta['depths']}, this config's exits.depths is {depths}")
        model = cls(backbone, meta["depths"], kind=meta.get("kind", "balcony"), init=meta.get("init", "last_layer"))
        model.meta = meta
        model.load_exits(exits_dir)
        if evaluation is not None:
            metrics = recorded_evaluation(Path(evaluation), exits_dir)
            if metrics is None:
                raise InputError(f"{evaluation}: not an evaluation of the exits in {exits_dir} (exits_sha256 differs or "
                                 "the file is missing): run the evaluate stage on them")
            model.meta = {**meta, "speculative_choice": metrics.get("speculative_choice")}
        return model

    def load_exits(self, exits_dir: Path, subset: bool = False) -> None:
        """This model's exits' weights from exported exits; `subset`: the folder may hold exits at other
        depths too (the search's candidates), which are left out."""
        from safetensors.torch import load_file

        state = load_file(str(Path(exits_dir) / WEIGHTS))
        if subset:
            state = {key: value for key, value in state.items() if key.split(".", 1)[0] in self.exits}
        missing, unexpected = self.exits.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{Path(exits_dir) / WEIGHTS}: missing {missing[:3]}, unexpected {unexpected[:3]} exit weights")
