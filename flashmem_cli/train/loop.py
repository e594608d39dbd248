"""Training the consolidator: the loop, held-out evaluation, checkpoints and the export.

Only the consolidator learns (AdamW, linear warm-up then cosine decay, gradients clipped); the
backbone is frozen. One step is one example: its context read once, its targets' losses
weighted by kind (`answer`, `restate`, `continue`) and averaged per token. Every `eval_every`
steps the held-out examples (built from the dev split, never trained on) are scored; the
learning curve records their mean answer loss under the consolidator with the three fixed
policies (full, truncate, keep-only) beside it, and the pooled gap recovered.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashmem_cli.memory.budget import DEFAULT_KEEP_RATIO
from flashmem_cli.store.files import commit_temp, temp_path_beside
from flashmem_cli.train import objective
from flashmem_cli.train.backbone import GemmaBackbone
from flashmem_cli.train.consolidator import TorchConsolidator
from flashmem_cli.train.examples import Example

DEFAULT_MIX = {"answer": 1.0, "restate": 0.5, "continue": 0.25}


@dataclass
class TrainConfig:
    steps: int = 500
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    n_latents: int = 8
    keep_ratio: float = DEFAULT_KEEP_RATIO
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0


@dataclass
class StepReport:
    step: int
    loss: float
    seconds: float
    held_out: dict[str, Any] | None = None


@dataclass
class TrainState:
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def example_loss(
    backbone: GemmaBackbone,
    consolidator: TorchConsolidator,
    example: Example,
    config: TrainConfig,
    frozen: objective.Frozen | None = None,
) -> torch.Tensor:
    """The weighted per-token loss of an example's targets after its span is consolidated."""
    frozen = frozen or objective.read_context(backbone, example)
    latents = objective.latents_for(backbone, consolidator, frozen, example, config.n_latents)
    cache = objective.compacted(frozen, example, "flashmem", config.keep_ratio, latents)
    total = torch.zeros(())
    for kind, weight in config.mix.items():
        targets = [t for t in example.targets if t.kind == kind]
        count = sum(objective.scored_count(t) for t in targets)
        if weight and count:
            nll = sum((objective.target_nll(backbone, cache, t) for t in targets), torch.zeros(()))
            total = total + weight * nll / count
    return total


class HeldOut:
    """Held-out examples with their context reads kept (they never change) and the fixed
    policies' answer losses computed once."""

    def __init__(self, backbone: GemmaBackbone, examples: list[Example], config: TrainConfig):
        self.backbone = backbone
        self.examples = examples
        self.config = config
        self.frozen = [objective.read_context(backbone, e) for e in examples]
        self.fixed = {
            policy: self._answer_loss(policy, lambda i: None)
            for policy in ("full", "truncate", "keep-only")
        }

    @torch.no_grad()
    def score(self, consolidator: TorchConsolidator) -> dict[str, Any]:
        def latents(i: int) -> objective.Cache:
            return objective.latents_for(
                self.backbone, consolidator, self.frozen[i], self.examples[i], self.config.n_latents
            )

        losses = dict(self.fixed)
        losses["flashmem"] = self._answer_loss("flashmem", latents)
        gap = losses["truncate"] - losses["full"]
        return {
            "answer_loss": {k: round(v, 4) for k, v in losses.items()},
            "gap_recovered": {
                policy: round((losses["truncate"] - losses[policy]) / gap, 4) if gap > 0 else None
                for policy in ("keep-only", "flashmem")
            },
        }

    @torch.no_grad()
    def _answer_loss(self, policy: str, latents: Callable[[int], Any]) -> float:
        """Mean per-token loss of the answers, pooled over the held-out examples."""
        total, count = 0.0, 0
        for i, (example, frozen) in enumerate(zip(self.examples, self.frozen, strict=True)):
            cache = objective.compacted(frozen, example, policy, self.config.keep_ratio, latents(i))
            for target in example.targets:
                if target.kind == "answer":
                    total += float(objective.target_nll(self.backbone, cache, target))
                    count += objective.scored_count(target)
        return total / max(1, count)


def train(
    backbone: GemmaBackbone,
    consolidator: TorchConsolidator,
    stream: Iterator[Example],
    held_out: HeldOut,
    config: TrainConfig,
    checkpoint: Path,
    state: TrainState | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Iterator[StepReport]:
    """Run from `state.step` to `config.steps`, yielding a report per step; checkpoints are
    written every `checkpoint_every` steps and at the end."""
    state = state or TrainState()
    optimizer = torch.optim.AdamW(
        consolidator.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if not state.curve:
        state.curve.append({"step": 0, **held_out.score(consolidator)})
    while state.step < config.steps:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, state.step)
        loss = example_loss(backbone, consolidator, next(stream), config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(consolidator.parameters(), config.clip)
        optimizer.step()
        state.step += 1
        value = float(loss.detach())
        state.losses.append(round(value, 4))
        report = None
        if state.step % config.eval_every == 0 or state.step == config.steps:
            report = {"step": state.step, **held_out.score(consolidator)}
            state.curve.append(report)
        state.seconds += time.perf_counter() - began
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            save_checkpoint(checkpoint, consolidator, optimizer, state, config)
        yield StepReport(state.step, value, time.perf_counter() - began, report)


def save_checkpoint(
    path: Path,
    consolidator: TorchConsolidator,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: TrainConfig,
) -> None:
    tmp = temp_path_beside(path)
    try:
        torch.save(
            {
                "consolidator": consolidator.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": asdict(state),
                "config": asdict(config),
            },
            tmp,
        )
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint, on the CPU whatever device wrote it (the run moves it where it trains)."""
    return torch.load(path, map_location="cpu", weights_only=False)
