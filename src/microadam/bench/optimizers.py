"""The optimizers ``microadam compare`` can run, by name, each with its install command.

A peer that is not installed is reported as such (``NotInstalled``), never
silently dropped. Every factory takes ``(params, lr, **overrides)`` where
``params`` is a list of parameters (or of param groups) and ``model`` is the
module (Adam-mini and GaLore need it to group parameters).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "NotInstalled", "OptimizerSpec", "build_optimizer", "get_spec"]


class NotInstalled(RuntimeError):
    """The optimizer's package is missing; the message holds the install command."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str
    module: str | None  # import that must succeed; None for torch's own
    install: str
    factory: Callable[..., torch.optim.Optimizer]
    present: Callable[[], bool] | None = None  # a further check (a class of a torch newer than the minimum)
    detail: Callable[[dict[str, Any]], str] | None = None  # what the label says of the arguments (GaLore's rank)

    def label_for(self, overrides: dict[str, Any]) -> str:
        """The label of a run with these constructor arguments (``[optimizers.NAME]``'s)."""
        return self.label if self.detail is None else f"{self.label} ({self.detail(overrides)})"

    def installed(self) -> bool:
        if self.present is not None and not self.present():
            return False
        return self.module is None or importlib.util.find_spec(self.module) is not None


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _microadam(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from microadam import MicroAdam

    return MicroAdam(_params(model), lr=lr, **kw)


def _microadam_paper(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return _microadam(model, lr, variant="paper", **kw)


def _adamw(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    params = _params(model)
    kw.setdefault("weight_decay", 0.0)
    if "fused" not in kw and "foreach" not in kw:
        # fused exists on CPU and CUDA for float parameters in torch >= 2.4.
        kw["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, **kw)


def _adafactor(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(_params(model), lr=lr, **kw)


def _quiet_bnb_gemm_warning(record: logging.LogRecord) -> bool:
    # bitsandbytes >= 0.50 warns on import, on CPUs with AVX512-BF16, that its 4-bit matmul kernel
    # needs the `kernels` package: nothing to do with AdamW8bit, and a confusing line in every run.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def _bnb_adamw8bit(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    cpu_ops.addFilter(_quiet_bnb_gemm_warning)
    import bitsandbytes as bnb

    kw.setdefault("weight_decay", 0.0)
    return bnb.optim.AdamW8bit(_params(model), lr=lr, **kw)


def _torchao(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
        import torchao.optim

        kw.setdefault("weight_decay", 0.0)
        return getattr(torchao.optim, cls_name)(_params(model), lr=lr, **kw)

    return make


GALORE_RANK = 64  # GaLore's own example setting for models of this size


def _galore(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    rank = kw.pop("rank", GALORE_RANK)
    update_proj_gap = kw.pop("update_proj_gap", 200)
    scale = kw.pop("scale", 0.25)
    low_rank = [p for p in _params(model) if p.dim() == 2 and min(p.shape) > rank]
    ids = {id(p) for p in low_rank}
    rest = [p for p in _params(model) if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": rest}]
    if low_rank:
        groups.append(
            {"params": low_rank, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": "std"}
        )
    kw.setdefault("weight_decay", 0.0)
    return GaLoreAdamW(groups, lr=lr, **kw)


def _adam_mini(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    cfg = getattr(model, "config", None)
    dim = kw.pop("dim", getattr(cfg, "hidden_size", None) or 2048)
    n_heads = kw.pop("n_heads", getattr(cfg, "num_attention_heads", None) or 32)
    kw.setdefault("weight_decay", 0.0)
    return Adam_mini(named_parameters=model.named_parameters(), lr=lr, dim=dim, n_heads=n_heads, **kw)


def _came(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from came_pytorch import CAME

    return CAME(_params(model), lr=lr, **kw)


def _lion(model: torch.nn.Module, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(_params(model), lr=lr, **kw)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("microadam", "MicroAdam", None, "pip install microadam", _microadam),
        # The paper's algorithm exactly (no released error feedback): the default before issue 8.
        OptimizerSpec("microadam_paper", "MicroAdam (paper)", None, "pip install microadam", _microadam_paper),
        OptimizerSpec("adamw", "AdamW (torch, fused)", None, "pip install torch", _adamw),
        OptimizerSpec(
            "adafactor",
            "Adafactor (torch)",
            None,
            "pip install 'torch>=2.5'",
            _adafactor,
            present=lambda: hasattr(torch.optim, "Adafactor"),  # new in torch 2.5
        ),
        OptimizerSpec(
            "adamw8bit", "AdamW8bit (bitsandbytes)", "bitsandbytes", "pip install bitsandbytes", _bnb_adamw8bit
        ),
        OptimizerSpec(
            "torchao_adamw8bit", "AdamW8bit (torchao)", "torchao", "pip install torchao", _torchao("AdamW8bit")
        ),
        OptimizerSpec(
            "torchao_adamw4bit", "AdamW4bit (torchao)", "torchao", "pip install torchao", _torchao("AdamW4bit")
        ),
        OptimizerSpec(
            "galore",
            "GaLore AdamW",
            "galore_torch",
            "pip install galore-torch",
            _galore,
            detail=lambda kw: f"r={kw.get('rank', GALORE_RANK)}",
        ),
        OptimizerSpec("adam_mini", "Adam-mini", "adam_mini", "pip install adam-mini", _adam_mini),
        OptimizerSpec("came", "CAME", "came_pytorch", "pip install came-pytorch", _came),
        OptimizerSpec("lion", "Lion", "lion_pytorch", "pip install lion-pytorch", _lion),
    ]
}


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def build_optimizer(name: str, model: torch.nn.Module, lr: float, **overrides: Any) -> torch.optim.Optimizer:
    """Instantiate optimizer ``name`` for ``model``; raise :class:`NotInstalled` with the install command."""
    spec = get_spec(name)
    if not spec.installed():
        raise NotInstalled(f"{spec.label} is not installed: {spec.install}")
    return spec.factory(model, lr, **overrides)
