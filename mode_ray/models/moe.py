"""CLIP-MoE (docs/moe.md): a routed mixture of MLP experts in place of each open_clip block's MLP.

open_clip's `ResidualAttentionBlock` computes `x + ls_2(mlp(ln_2(x)))`; `MoEMLP` replaces `mlp`, so the block,
the towers and every open_clip entry point (`encode_image`, `encode_text`, the model's forward) work unchanged.
Upcycling builds the experts from the MLPs of the MCL stage models (expert i of block ℓ = block ℓ's MLP of stage
i, stage 0 being the base) and takes everything else from the base.

Routing follows the reference: a bias-free linear router on the MLP's input, per token; softmax over the
experts; top-k; the k weights renormalised to sum to 1; no noise, no capacity limit. Tokens reach their experts
by index (gather, then `index_add_` back), so the cost grows with k, not with the number of experts. Each layer
keeps its last router probabilities and picks for the load-balancing loss and the usage statistics.

No Ray here: plain torch, unit-tested as such.
"""

from __future__ import annotations

import copy
import io
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

TOWERS = ("image", "text")
MOE_CONFIG_FILE = "moe_config.json"
MOE_WEIGHTS_FILE = "moe_model.pt"


class MoEMLP(nn.Module):
    """Top-k routed MLP experts with the signature of the MLP it replaces: tensor in, tensor out."""

    def __init__(self, experts: list[nn.Module], top_k: int, expert_dropout: float = 0.0) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}], got {top_k}")
        width = experts[0].c_fc.in_features
        self.experts = nn.ModuleList(experts)
        self.gate = nn.Linear(width, len(experts), bias=False)  # "gate": the reference's router parameter name
        self.top_k = top_k
        # Expert dropout as in Switch Transformers: dropout on each expert's hidden activations, training only.
        self.expert_dropout = nn.Dropout(expert_dropout)
        self.last_probs: torch.Tensor | None = None  # (tokens, experts) router probabilities of the last call
        self.last_topk: torch.Tensor | None = None  # (tokens, k) expert picks of the last call
        self.track_usage = False
        self.register_buffer("usage", torch.zeros(len(experts), dtype=torch.float64), persistent=False)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def c_fc(self) -> nn.Module:
        """open_clip reads a block's dtype from `mlp.c_fc`: the first expert's answers for all."""
        return self.experts[0].c_fc

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities over all experts, top-k weights renormalised to sum to 1, top-k expert indices)."""
        probs = torch.softmax(self.gate(tokens).float(), dim=-1)
        weights, picks = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(tokens.dtype), picks

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.experts[e]
        return mlp.c_proj(self.expert_dropout(mlp.gelu(mlp.c_fc(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs, weights, picks = self.route(tokens)
        self.last_probs, self.last_topk = probs, picks
        if self.track_usage:
            self.usage += torch.bincount(picks.flatten(), minlength=self.n_experts).to(self.usage)
        out = torch.zeros_like(tokens)
        for e in range(self.n_experts):
            token_idx, slot = torch.nonzero(picks == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = self._expert(e, tokens.index_select(0, token_idx))
            out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1))
        return out.reshape(shape)


def balance_loss(probs: torch.Tensor, picks: torch.Tensor, n_experts: int, counts: str = "top1") -> torch.Tensor:
    """Switch-style load balancing, E · Σ_e f_e · P_e: f_e the share of tokens sent to expert e (by their
    top-1 pick, the paper's form; or every top-k slot, the reference code's), P_e its mean router probability.
    1 for a uniform router, E for one that sends everything to one expert."""
    chosen = picks[:, :1] if counts == "top1" else picks
    f = torch.bincount(chosen.flatten(), minlength=n_experts).to(probs.dtype) / chosen.numel()
    return n_experts * torch.sum(f * probs.mean(dim=0))


@dataclass
class MoESpec:
    """What an upcycled model is: its base open_clip config, experts, top-k and which blocks are MoE."""

    base_model: str  # the open_clip model name of the base (its config travels in `open_clip_config`)
    open_clip_config: dict[str, Any]
    n_experts: int
    top_k: int
    towers: list[str] = field(default_factory=lambda: list(TOWERS))
    layers: dict[str, list[int]] = field(default_factory=dict)  # tower → block indices; filled by `upcycle`
    expert_dropout: float = 0.0


def tower_blocks(model: nn.Module, tower: str) -> list[nn.Module]:
    """The residual blocks of one open_clip CLIP tower."""
    transformer = model.visual.transformer if tower == "image" else model.transformer
    return list(transformer.resblocks)


def moe_layers(model: nn.Module) -> Iterator[tuple[str, int, MoEMLP]]:
    """(tower, block index, MoE layer) for every MoE layer of an upcycled model."""
    model = getattr(model, "module", model)
    for tower in TOWERS:
        for i, block in enumerate(tower_blocks(model, tower)):
            if isinstance(block.mlp, MoEMLP):
                yield tower, i, block.mlp


def mlp_state(model: nn.Module) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Every block's MLP weights, {tower: {block: state dict}}: what one MCL stage contributes as an expert."""
    model = getattr(model, "module", model)
    return {
        tower: {
            i: {k: v.detach().cpu().clone() for k, v in b.mlp.state_dict().items()}
            for i, b in enumerate(tower_blocks(model, tower))
        }
        for tower in TOWERS
    }


def upcycle(
    base: nn.Module,
    stage_mlps: list[dict[str, dict[int, dict[str, torch.Tensor]]]],
    spec: MoESpec,
    router_seed: int = 0,
) -> nn.Module:
    """Replace the MLP of every chosen block with a MoE whose expert i is that block's MLP from stage i
    (`stage_mlps[0]` is normally the base's own). Routers start random (seeded), as in the reference."""
    if len(stage_mlps) != spec.n_experts:
        raise ValueError(f"{spec.n_experts} experts need {spec.n_experts} stage MLP sets, got {len(stage_mlps)}")
    generator = torch.Generator().manual_seed(router_seed)
    for tower in spec.towers:
        blocks = tower_blocks(base, tower)
        chosen = spec.layers.get(tower) or list(range(len(blocks)))
        spec.layers[tower] = chosen
        for i in chosen:
            block = blocks[i]
            experts = []
            for stage in stage_mlps:
                mlp = copy.deepcopy(block.mlp)
                mlp.load_state_dict(stage[tower][i])
                experts.append(mlp)
            moe = MoEMLP(experts, spec.top_k, spec.expert_dropout)
            with torch.no_grad():
                gate = torch.empty_like(moe.gate.weight)
                nn.init.kaiming_uniform_(gate, a=5**0.5, generator=generator)  # nn.Linear's own init, seeded
                moe.gate.weight.copy_(gate.to(moe.gate.weight))
            block.mlp = moe.to(next(block.parameters()).device)
    return base


def pooled_balance_loss(probs: torch.Tensor, picks: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The reference's form (CLIP-MoE, clipmoe/model_clipmoe.py `load_balancing_loss_func`): the tokens of all
    of a tower's layers pooled, f_e the share of tokens with expert e in any of their top-k slots — so the f_e
    sum to k — and P_e its mean router probability: E · Σ_e f_e · P_e."""
    f = torch.bincount(picks.flatten(), minlength=n_experts).to(probs.dtype) / picks.shape[0]
    return n_experts * torch.sum(f * probs.mean(dim=0))


def moe_balance_loss(
    model: nn.Module, counts: str, text_weight: float, form: str = "per_layer", world_size: int = 1
) -> torch.Tensor:
    """The load-balancing loss of a forward pass, image + `text_weight` · text. `per_layer` (the paper's form):
    averaged over the MoE layers of each tower, f_e counting `counts` (top-1 picks or every slot). `reference`:
    the reference code's form, tokens pooled over a tower's layers (`pooled_balance_loss`) and divided by the
    world size, as the reference divides each rank's loss (its effective coefficient is coef / world size)."""
    per_tower: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {t: [] for t in TOWERS}
    for tower, _, layer in moe_layers(model):
        if layer.last_probs is not None:
            per_tower[tower].append((layer.last_probs, layer.last_topk, layer.n_experts))
    weights = {"image": 1.0, "text": text_weight}
    total = []
    for tower, layers in per_tower.items():
        if not layers:
            continue
        if form == "reference":
            probs, picks = torch.cat([p for p, _, _ in layers]), torch.cat([k for _, k, _ in layers])
            value = pooled_balance_loss(probs, picks, layers[0][2]) / world_size
        else:
            value = torch.stack([balance_loss(p, k, n, counts) for p, k, n in layers]).mean()
        total.append(weights[tower] * value)
    return torch.stack(total).sum() if total else torch.zeros(())


def set_trainable(model: nn.Module, which: Literal["all", "mlp", "router"]) -> list[str]:
    """Freeze every parameter but the chosen ones: all, the blocks' MLPs (an MCL stage) or the routers."""
    model = getattr(model, "module", model)
    names = []
    for name, param in model.named_parameters():
        if which == "all":
            train = True
        elif which == "mlp":
            train = ".mlp.c_fc." in name or ".mlp.c_proj." in name
        else:
            train = name.endswith(".mlp.gate.weight")
        param.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(f"no {which} parameters in this model")
    return names


def expert_usage(model: nn.Module, reset: bool = True) -> dict[str, dict[str, list[float]]]:
    """Share of routed token slots per expert, {tower: {block: [share per expert]}}, since the last reset."""
    out: dict[str, dict[str, list[float]]] = {t: {} for t in TOWERS}
    for tower, i, layer in moe_layers(model):
        total = float(layer.usage.sum())
        out[tower][str(i)] = [float(u) / total if total else 0.0 for u in layer.usage.tolist()]
        if reset:
            layer.usage.zero_()
    return {t: v for t, v in out.items() if v}


def track_usage(model: nn.Module, on: bool = True) -> None:
    for _, _, layer in moe_layers(model):
        layer.track_usage = on


# --------------------------------------------------------------------------- saving and loading


def moe_state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(OrderedDict((k, v.detach().cpu()) for k, v in getattr(model, "module", model).state_dict().items()), buf)
    return buf.getvalue()


def spec_json(spec: MoESpec) -> str:
    return json.dumps(asdict(spec), indent=2)


def build_moe_skeleton(spec: MoESpec) -> nn.Module:
    """An upcycled model of the right shape (weights to be loaded): the base built from its stored open_clip
    config, every chosen MLP replaced by `n_experts` copies of itself."""
    import tempfile

    import open_clip

    name = f"{spec.base_model}-moe-base"
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/{name}.json", "w") as f:
            json.dump(spec.open_clip_config, f)
        open_clip.add_model_config(f"{tmp}/{name}.json")
    base = open_clip.create_model(name)
    same = mlp_state(base)
    return upcycle(base, [same] * spec.n_experts, MoESpec(**{**asdict(spec), "layers": dict(spec.layers)}))


def save_moe(model: nn.Module, spec: MoESpec, out_dir: str, s3: Any = None) -> str:
    """`moe_config.json` (the spec, base config included) + `moe_model.pt` (a plain state dict) under out_dir."""
    from mode_ray.run_root.storage import join, write_bytes

    write_bytes(join(out_dir, MOE_CONFIG_FILE), spec_json(spec).encode(), s3)
    write_bytes(join(out_dir, MOE_WEIGHTS_FILE), moe_state_bytes(model), s3)
    return out_dir


def load_moe(model_dir: str, s3: Any = None, device: str = "cpu") -> tuple[nn.Module, MoESpec, Any, Any]:
    """(model in eval mode, spec, eval transform, tokenizer) from a folder `save_moe` wrote, local or remote."""
    import open_clip

    from mode_ray.run_root.storage import join, read_bytes

    spec = MoESpec(**json.loads(read_bytes(join(model_dir, MOE_CONFIG_FILE), s3)))
    model = build_moe_skeleton(spec)
    weights = io.BytesIO(read_bytes(join(model_dir, MOE_WEIGHTS_FILE), s3))
    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only: never run a pickle
    model.load_state_dict(state)
    cfg = spec.open_clip_config["vision_cfg"]
    eval_tf = open_clip.image_transform(cfg["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer(f"{spec.base_model}-moe-base")
    return model.to(device).eval(), spec, eval_tf, tokenizer
