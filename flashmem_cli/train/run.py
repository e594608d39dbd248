"""`flashmem train-consolidator`: everything a training run needs, set up from a model file.

The run reads the model twice: llama.cpp for its tokenizer and chat template (examples are
tokenized exactly as chat feeds them), and the GGUF's weights into the torch backbone. Training
examples come from the recall generator's train share (or `--data`); the held-out examples from
the dev split that ships in bench/data. The result is the int8 weights file the numpy runtime
loads, with a JSON record beside it: the command's settings, the data, the commit, the time and
the learning curve.
"""

from __future__ import annotations

import math
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashmem_cli.bench.recall_cases import RecallCase, parse_cases
from flashmem_cli.chat.memory import layer_spec
from flashmem_cli.engine.backend import Model
from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.consolidator import output_norm, untrained_weights
from flashmem_cli.memory.gguf_tensors import GGUFTensors
from flashmem_cli.memory.weights import save_weights
from flashmem_cli.models import ModelFile, chat_template_for
from flashmem_cli.store.files import atomic_write_json
from flashmem_cli.train.backbone import GemmaBackbone
from flashmem_cli.train.consolidator import TorchConsolidator, with_readout
from flashmem_cli.train.examples import Example, examples, generated_cases
from flashmem_cli.train.loop import HeldOut, StepReport, TrainConfig, TrainState, train
from flashmem_cli.train.loop import load_checkpoint as read_checkpoint
from flashmem_cli.train.objective import consolidator_layer

DEV_FILE = Path(__file__).resolve().parent.parent / "bench" / "data" / "recall-dev.jsonl"
HELD_OUT_EXAMPLES = 24


@dataclass
class RunPaths:
    weights: Path  # the int8 .npz the runtime loads

    @property
    def checkpoint(self) -> Path:
        return self.weights.with_name(self.weights.name + ".ckpt.pt")

    @property
    def record(self) -> Path:
        return self.weights.with_name(self.weights.name.removesuffix(".npz") + ".json")


def pick_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU: the same computation on each."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TrainingRun:
    def __init__(
        self,
        file: ModelFile,
        config: TrainConfig,
        paths: RunPaths,
        data: Path | None = None,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device()
        if self.device.type != "cpu":  # new tensors follow; on the CPU this only costs time
            torch.set_default_device(self.device)
        self.file, self.config, self.paths, self.data = file, config, paths, data
        paths.weights.parent.mkdir(parents=True, exist_ok=True)
        self.model = Model(file.path, n_gpu_layers=0)  # the tokenizer and chat template only
        self.template = chat_template_for(self.model)
        self.backbone = GemmaBackbone.from_gguf(file.path).to(self.device)
        self.consolidator = self._initial_consolidator().to(self.device)
        self.state: TrainState | None = None
        self.n_held_out = 0
        self.optimizer_state: dict[str, Any] | None = None

    def close(self) -> None:
        self.model.close()

    def _initial_consolidator(self) -> TorchConsolidator:
        info = self.model.info()
        spec = layer_spec(info)
        with GGUFTensors(self.file.path) as tensors:
            layer = consolidator_layer(self.backbone)
            weights = untrained_weights(tensors, layer, spec, info.n_embd, self.file.fingerprint)
            norm = output_norm(tensors)
        embeddings = self.backbone.w["token_embd.weight"]
        rows = embeddings[torch.arange(0, len(embeddings), 64)]
        gain = float(rows.pow(2).mean().sqrt()) / float(np.sqrt((norm**2).mean()))
        return TorchConsolidator(
            with_readout(weights, norm, gain),
            n_head=spec.n_head,
            head_dim=spec.head_dim,
            rms_eps=spec.rms_eps,
            rope_base=spec.rope_base,
            input_scale=math.sqrt(info.n_embd),
        )

    def resume(self) -> None:
        """Go on from the checkpoint, refusing settings other than those it was trained with
        (but for --steps: a run may be made longer)."""
        saved = read_checkpoint(self.paths.checkpoint)
        ours = {k: v for k, v in asdict(self.config).items() if k != "steps"}
        theirs = {k: v for k, v in saved["config"].items() if k != "steps"}
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        if changed:
            raise FlashmemError(
                f"--resume: {self.paths.checkpoint} was trained with other settings "
                f"({', '.join(f'{k} {theirs.get(k)!r}' for k in changed)}); give the same "
                "ones, or start again without --resume"
            )
        self.consolidator.load_state_dict(saved["consolidator"])
        self.optimizer_state = saved["optimizer"]
        self.state = TrainState(**saved["state"])

    def held_out(self, n: int = HELD_OUT_EXAMPLES) -> HeldOut:
        cases = parse_cases(DEV_FILE.read_text().splitlines(), str(DEV_FILE))
        rng = random.Random(1234)
        window = self.backbone.config.n_swa
        chosen = take(examples(self.model, self.template, iter(cases * 4), rng, window=window), n)
        self.n_held_out = len(chosen)
        return HeldOut(self.backbone, chosen, self.config)

    def stream(self) -> Iterator[Example]:
        """Training examples; a resumed run draws new ones rather than repeat the first."""
        step = self.state.step if self.state else 0
        rng = random.Random(self.config.seed * 1_000_003 + step)
        window = self.backbone.config.n_swa
        return examples(self.model, self.template, self.cases(step), rng, window=window)

    def cases(self, step: int) -> Iterator[RecallCase]:
        if self.data is None:
            return generated_cases(self.config.seed * 1_000_003 + step)
        loaded = parse_cases(self.data.read_text().splitlines(), str(self.data))
        rng = random.Random(self.config.seed + step)
        return _shuffled_forever(loaded, rng)

    def run(self, held_out: HeldOut) -> Iterator[StepReport]:
        self.state = self.state or TrainState()
        return train(
            self.backbone,
            self.consolidator,
            self.stream(),
            held_out,
            self.config,
            self.paths.checkpoint,
            self.state,
            self.optimizer_state,
        )

    def export(self, state: TrainState, command: list[str]) -> dict[str, Any]:
        """Write the trained int8 weights and their record (how they were made)."""
        save_weights(self.paths.weights, self.consolidator.export(trained=True))
        record = {
            "model": self.file.name,
            "model_fingerprint": self.file.fingerprint,
            "command": " ".join(command),
            "data": str(self.data) if self.data else "built-in: recall generator, train share",
            "held_out": f"{self.n_held_out} examples from {DEV_FILE.name} (dev split)",
            "commit": git_commit(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "config": asdict(self.config),
            "steps": state.step,
            "train_seconds": round(state.seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "learning_curve": state.curve,
            "train_loss_every_50": [
                round(float(np.mean(state.losses[i : i + 50])), 4)
                for i in range(0, len(state.losses), 50)
            ],
        }
        atomic_write_json(self.paths.record, record)
        return record


def take(stream: Iterator[Example], n: int) -> list[Example]:
    out = []
    for example in stream:
        out.append(example)
        if len(out) == n:
            break
    return out


def _shuffled_forever(cases: list[RecallCase], rng: random.Random) -> Iterator[RecallCase]:
    while True:
        order = list(cases)
        rng.shuffle(order)
        yield from order


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
