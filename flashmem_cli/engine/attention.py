"""What the backbone attends to, read while llama.cpp decodes (flash attention off).

`AttentionCapture` taps the `kq_soft_max-<layer>` nodes through the eval callback and keeps:
- `last_rows`: the last layer's attention of the batch's last token, (n_head, n_kv), for the
  Cognitive Monitor's entropy;
- `cell_mass`: the attention each KV *cell* has received on the global layers, summed over
  every query and head since the cell was filled (prompt processing included);
- `visible_cells`: the cells the batch's last token could see on a global layer, ascending -
  for a single sequence, all of its cells; `llama_state_seq_get_data` lists the same cells in the same
  order, which is how a cell's mass is matched to its position;
- `last_hidden`: the final normed hidden state of the batch's last output (`result_norm`). Read
  here rather than with `embeddings = true`, which makes llama.cpp compute the logits of every
  prompt token (it doubled prompt processing here).
Cells are not positions: after a removal and a shift new tokens reuse freed cells.
"""

from __future__ import annotations

import numpy as np

from flashmem_cli.engine.ggml import (
    GGML_TYPE_F32,
    GgmlTensor,
    NodeTap,
    attention_rows,
    read_f32,
    read_row,
)

HIDDEN_NODE = "result_norm"


class AttentionCapture:
    def __init__(self, last_layer: int, mass_layers: list[int], n_cells: int):
        self.last_name = f"kq_soft_max-{last_layer}"
        self.mass_names = {f"kq_soft_max-{layer}" for layer in mass_layers}
        # Cells are read from a global layer's mask: a windowed last layer sees only its window.
        self.cells_name = f"kq_soft_max-{max(mass_layers)}" if mass_layers else self.last_name
        self.cell_mass = np.zeros(n_cells, dtype=np.float64)
        self.last_rows: np.ndarray | None = None
        self.last_hidden: np.ndarray | None = None
        self.visible_cells = np.empty(0, dtype=np.int64)
        self.track_mass = True
        names = {self.last_name, self.cells_name, HIDDEN_NODE, *self.mass_names}
        self.tap = NodeTap(names, self._on_node)

    def check(self) -> None:
        """Raise what a callback raised during the last decode."""
        self.tap.check()

    def forget_cells(self, cells: np.ndarray) -> None:
        """Cells whose tokens left the cache: no longer visible, from zero when reused."""
        self.cell_mass[cells] = 0.0
        self.visible_cells = np.setdiff1d(self.visible_cells, cells, assume_unique=True)

    def _on_node(self, name: str, ptr: int) -> None:
        if name == HIDDEN_NODE:
            rows = read_f32(ptr).reshape(-1, int(GgmlTensor.from_address(ptr).ne[0]))
            if len(rows):  # a prompt chunk that wants no logits has no outputs
                self.last_hidden = rows[-1]
            return
        tensor = GgmlTensor.from_address(ptr)
        n_kv, n_tokens = int(tensor.ne[0]), int(tensor.ne[1])
        if name == self.last_name:
            self.last_rows = attention_rows(ptr, n_tokens - 1)
        if name == self.cells_name:
            self.visible_cells = _visible_cells(tensor, n_kv, n_tokens - 1)
        if self.track_mass and name in self.mass_names:
            probs = self.last_rows if n_tokens == 1 and name == self.last_name else None
            if probs is None:
                probs = read_f32(ptr).reshape(-1, n_kv)
            self.cell_mass[:n_kv] += probs.sum(axis=0, dtype=np.float64)


def _visible_cells(softmax: GgmlTensor, n_kv: int, token: int) -> np.ndarray:
    """Cells the mask of a `kq_soft_max` node leaves open to batch token `token`."""
    mask_ptr = softmax.src[1]
    if not mask_ptr:
        return np.arange(n_kv)
    mask = GgmlTensor.from_address(mask_ptr)
    if mask.type == GGML_TYPE_F32:
        row = read_row(mask_ptr, token, n_kv, np.float32)
    else:
        row = read_row(mask_ptr, token, n_kv, np.float16)
    return np.flatnonzero(np.isfinite(row) & (row > -1e30))
