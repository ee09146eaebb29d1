"""Which keys a query sees in a forward pass without a KV cache, and the three ways to compute that attention.

A query sees earlier keys only (causal); with attention_mask: document, only those of its own document of a packed
row (the end-of-text separator ends a document and belongs to it); with a sliding window of N, only the last N
positions, its own included. `attention_plan` (called by the model's forward) looks at the rows once and returns an
`AttentionPlan` that every layer shares, each layer passing its own window. The backends (`attention_backend`)
compute the same attention:

- flex: FlexAttention with a block mask built from the document boundaries tile by tile (128 x 128 positions, so
  (T/128)^2 entries per row, never T^2): tiles no query of which sees a key of the other are skipped, tiles that
  are wholly visible run without evaluating the mask. flex_attention is compiled once per shape (uncompiled it
  materializes the scores). torch >= 2.5 has it on CUDA, >= 2.6 on CPU for inference only: no torch up to 2.13 has
  a CPU backward pass. `FLEX_ATTENTION` checks what this torch offers.
- varlen: one SDPA call per document (is_causal, so the fused kernels run), a long document under a window cut into
  window-sized chunks of queries; memory O(T) and compute the sum of the documents' squares. Reads the document
  lengths on the host once per forward pass.
- mask: SDPA under a dense (B, 1, T, T) bool mask: the reference, and the path where the others cannot run.
"""

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from lunaris.errors import ConfigError

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:
    BlockMask = flex_attention = None

# torch >= 2.5: SDPA shares each KV head across its query group itself (enable_gqa), without
# materializing the repeated keys/values (a copy forward, a reduction backward).
SDPA_HAS_GQA = torch.__version__ >= (2, 5)

# The flex path needs block masks that know the sequence length (rows of any length, not only multiples of a
# tile), which BlockMask.from_kv_blocks takes as `seq_lengths` in the torch versions that run it on CPU as well.
FLEX_ATTENTION = BlockMask is not None and "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
FLEX_TILE = 128  # FlexAttention's block size: the block mask has one entry per FLEX_TILE x FLEX_TILE tile

_COMPILED_FLEX: list = []


def sdpa(q, k, v, mask=None, causal: bool = False, dropout: float = 0.0):
    """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, S, hd) -> (B, Hq, T, hd), each KV head serving Hq/Hkv query
    heads (GQA). `mask` (broadcastable to (B, Hq, T, S)) bool, True where a query may see a key."""
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, Hq, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, **gqa)


def window_band(T: int, S: int, window: Optional[int], device):
    """(T, S) bool for T queries after S - T cached keys: key j visible to query i (at position S - T + i) when
    j <= S - T + i and, with a window, S - T + i - j < window. None when every key up to the query is visible and
    SDPA needs no mask (S == T: is_causal; T == 1: the one query sees every key)."""
    if (window is None or window >= S) and (S == T or T == 1):
        return None
    query = torch.arange(S - T, S, device=device)[:, None]              # (T, 1) positions of the queries
    key = torch.arange(S, device=device)[None, :]                       # (1, S)
    visible = key <= query
    return visible if window is None else visible & (query - key < window)


def documents(idx: torch.Tensor, separator: int):
    """(document (B, T) long: each token's document within its row, 0, 1, ...; positions (B, T) long: its position
    within its document). The separator ends a document: the token after it starts the next one."""
    B, T = idx.shape
    ends = idx == separator                                                    # (B, T)
    starts = torch.cat([ends.new_zeros(B, 1), ends[:, :-1]], dim=1)           # (B, T) a document starts here
    index = torch.arange(T, device=idx.device)
    first = torch.where(starts, index, 0).cummax(dim=1).values                 # (B, T) where its document starts
    return starts.long().cumsum(dim=1), index - first


def dense_mask(document: Optional[torch.Tensor], T: int, window: Optional[int], device):
    """(B, 1, T, T) bool (B = 1 without documents), True where a query sees a key: causal, within its document
    (document (B, T) or None), within the window."""
    visible = window_band(T, T, window, device)
    if visible is None:
        visible = torch.ones(T, T, dtype=torch.bool, device=device).tril()    # (T, T)
    if document is None:
        return visible[None, None]
    return ((document[:, :, None] == document[:, None, :]) & visible)[:, None]   # (B, 1, T, T)


def document_mask(idx: torch.Tensor, separator: int):
    """Rotary positions (B, T) and the dense attention mask (B, 1, T, T) bool of rows that pack several documents:
    a query sees the keys of its own document up to itself, each document at positions from 0."""
    document, positions = documents(idx, separator)
    return positions, dense_mask(document, idx.shape[1], None, idx.device)


def document_lengths(document: torch.Tensor) -> list:
    """Each row's document lengths, host ints ([[6, 11, 7], ...]); one read from the device."""
    B, T = document.shape
    rows = [[0] for _ in range(B)]
    starts = (document[:, 1:] != document[:, :-1]).nonzero() + torch.tensor([0, 1], device=document.device)
    for b, t in starts.tolist():                                              # (row, position) of each new document
        rows[b].append(t)
    return [[end - start for start, end in zip(row, row[1:] + [T])] for row in rows]


def varlen_attention(q, k, v, lengths: list, window: Optional[int], dropout: float):
    """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, T, hd) one document at a time -> (B, Hq, T, hd).

    `lengths`: each row's document lengths, or one list for all rows (then every row is cut alike and the batch
    runs together). A document's queries see its keys causally (is_causal); with a window, a document longer than
    it is cut into chunks of `window` queries, each seeing the window - 1 keys before it too, under a band mask of
    (window, 2 window - 1).
    """
    shared = len(lengths) == 1
    band = None if window is None else window_band(window, 2 * window - 1, window, q.device)  # (W, 2W - 1)
    rows = []
    for b, row in enumerate(lengths):
        r = slice(None) if shared else slice(b, b + 1)
        pieces, start = [], 0
        for length in row:
            step = window if window is not None and length > window else length
            for q0 in range(start, start + length, step):
                q1 = min(q0 + step, start + length)
                k0 = max(start, q0 - step + 1)      # the first chunk of a document starts its keys: is_causal
                mask = None if k0 == q0 else band[:q1 - q0, :q1 - k0]
                pieces.append(sdpa(q[r, :, q0:q1], k[r, :, k0:q1], v[r, :, k0:q1], mask, mask is None, dropout))
            start += length
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _ordered(dense: torch.Tensor):
    """A (B, n, n) bool tile mask as FlexAttention's (count (B, 1, n), indices (B, 1, n, n)) int32 per query tile:
    the visible key tiles first, in order."""
    dense = dense[:, None]
    indices = torch.argsort(dense.to(torch.int32), dim=-1, descending=True, stable=True)
    return dense.sum(dim=-1, dtype=torch.int32), indices.to(torch.int32)


def tile_masks(document: Optional[torch.Tensor], T: int, window: Optional[int], device):
    """(touched, full), each (B, n, n) bool over (query tile, key tile), n = ceil(T / FLEX_TILE), B = 1 without
    documents: some query of the tile sees some key of the other (touched), or every query every key (full).

    Read from the tiles' first and last documents: documents are contiguous, so a key tile before the query tile
    shares a document with it exactly when its last document is the query tile's first, and every pair shares one
    when the key tile's first document is the query tile's last. Positions past T (the last tile's padding) do
    not count: FlexAttention drops them.
    """
    doc = torch.zeros(1, T, dtype=torch.long, device=device) if document is None else document
    n = -(-T // FLEX_TILE)
    start = torch.arange(n, device=device) * FLEX_TILE                         # (n,) a tile's first position
    end = (start + FLEX_TILE).clamp(max=T) - 1                                 # (n,) ... and its last
    first, last = doc[:, start], doc[:, end]                                   # (B, n) their documents
    nearest = start[:, None] - end[None, :]                                    # (n, n) [query tile, key tile]
    farthest = end[:, None] - start[None, :]
    touched = (farthest >= 0) & (last[:, None, :] >= first[:, :, None])        # (B, n, n)
    full = (nearest >= 0) & (first[:, None, :] == last[:, :, None])
    if window is not None:
        touched = touched & (nearest < window)                                 # the nearest pair in the window
        full = full & (farthest < window)                                      # the farthest pair too
    return touched, full


def flex_block_mask(document: Optional[torch.Tensor], T: int, window: Optional[int], batch: int, device):
    """The BlockMask of causal, same-document (document (B, T) or None: one document per row), in-window attention
    for `batch` rows: the partial tiles evaluate `mask_mod` per pair, the full ones run unmasked, the others are
    skipped (`tile_masks`). The window and documents reach `mask_mod` as tensors, so the compiled kernel is reused
    whatever their values (only shapes recompile)."""
    doc = torch.zeros(batch, T, dtype=torch.long, device=device) if document is None else document
    touched, full = tile_masks(doc, T, window, device)
    padded = F.pad(doc, (0, touched.shape[-1] * FLEX_TILE - T), value=-1)    # (B, n * FLEX_TILE): whole tiles
    limit = torch.tensor(T if window is None else window, device=device)     # () keys closer than this

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < limit) & (padded[b, q_idx] == padded[b, kv_idx])

    return BlockMask.from_kv_blocks(*_ordered(touched & ~full), *_ordered(full), BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def flex(q, k, v, block_mask):
    """FlexAttention of q (B, Hq, T, hd) over k, v (B, Hkv, T, hd) -> (B, Hq, T, hd): compiled once (and reused by
    every model) unless the caller is being compiled already, which compiles it with the rest."""
    if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ConfigError(f"model.attention_backend: flex cannot train on the CPU: FlexAttention has no CPU backward "
                          f"pass in torch {torch.__version__}. Use attention_backend: auto (varlen on the CPU), or "
                          f"run without gradients (torch.no_grad) for evaluation.")
    if torch.compiler.is_compiling():
        function = flex_attention
        if q.device.type == "cpu":  # inductor's CPU kernel misreads q, k, v computed in the same graph with
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # transposed strides (wrong output, torch 2.13)
    else:
        if not _COMPILED_FLEX:
            _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
        function = _COMPILED_FLEX[0]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return function(q, k, v, block_mask=block_mask, **gqa)


def choose_backend(requested: str, device: torch.device, dropout: bool) -> str:
    """The backend of `attention_backend` `requested` for a forward pass on `device` (`dropout`: attention dropout is
    active). auto: flex on CUDA (varlen launches a kernel per document and reads lengths on the host), varlen on the
    CPU (FlexAttention has no CPU backward, and varlen measured fastest there, bench/bench_attention.py), mask
    under torch.compile on the CPU (varlen's shapes change with every batch) and wherever flex cannot run."""
    if requested == "auto":
        if device.type == "cuda" and FLEX_ATTENTION and not dropout:
            return "flex"
        if device.type == "cpu" and not torch.compiler.is_compiling():
            return "varlen"
        return "mask"
    if requested == "flex" and not FLEX_ATTENTION:
        raise ConfigError(f"model.attention_backend: flex needs FlexAttention block masks with sequence lengths, "
                          f"which torch {torch.__version__} lacks (torch 2.6 or later has them); use "
                          f"attention_backend: auto.")
    if requested == "flex" and dropout:
        raise ConfigError("model.attention_backend: flex has no attention dropout; set model.dropout: 0 or use "
                          "attention_backend: auto.")
    return requested


class AttentionPlan:
    """The attention of one forward pass without a cache, shared by every layer: causal, within each token's
    document (`document` (B, T) long, or None: a row is one document), within the window each layer passes.

    `positions` (B, T): rotary positions restarting at each document (None without documents). The masks of the
    `windows` the layers use (None: full context) are built once here, for every layer (and the recomputation of
    gradient checkpointing); varlen reads the document lengths here instead.
    """

    def __init__(self, backend: str, idx: torch.Tensor, document=None, positions=None, windows=(None,)):
        self.backend, self.document, self.positions = backend, document, positions
        B, self.T = idx.shape
        self.lengths = None
        if backend == "varlen":
            self.lengths = [[self.T]] if document is None else document_lengths(document)
        self._masks = {}  # window -> BlockMask (flex) or (B or 1, 1, T, T) bool (mask)
        for window in windows:
            if self.backend != "varlen" and not self._plain(window):
                self._masks[window] = self._mask(window, B, idx.device)

    def attend(self, q, k, v, window: Optional[int], dropout: float = 0.0):
        """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, T, hd) -> (B, Hq, T, hd) under this plan, `window` the
        layer's sliding window (None: full context)."""
        if self._plain(window):
            return sdpa(q, k, v, causal=True, dropout=dropout)   # one document per row, full context
        if self.backend == "varlen":
            return varlen_attention(q, k, v, self.lengths, window, dropout)
        if window not in self._masks:
            self._masks[window] = self._mask(window, q.shape[0], q.device)
        if self.backend == "flex":
            return flex(q, k, v, self._masks[window])
        return sdpa(q, k, v, self._masks[window], dropout=dropout)

    def _plain(self, window) -> bool:
        return self.document is None and (window is None or window >= self.T)

    def _mask(self, window, batch: int, device):
        if self.backend == "flex":
            return eager_flex_block_mask(self.document, self.T, window, batch, device)
        return dense_mask(self.document, self.T, window, device)


# Block masks are built outside any compiled graph (one graph break in a compiled forward): inductor's CPU lowering
# of FlexAttention rejects block masks computed inside the graph ("No choices exist for backend", torch 2.13).
eager_flex_block_mask = torch.compiler.disable(flex_block_mask)


def attention_plan(idx: torch.Tensor, config, dropout: bool) -> Optional[AttentionPlan]:
    """The plan of a forward pass without a cache over idx (B, T), or None when it is plain causal attention: no
    document masking and no sliding window. `dropout`: attention dropout is active (training)."""
    documented = config.attention_mask == "document"
    if not documented and not config.windowed:
        return None
    backend = choose_backend(config.attention_backend, idx.device, dropout)
    windows = {config.layer_window(layer) for layer in range(config.n_layers)}
    if not documented:
        return AttentionPlan(backend, idx, windows=windows)
    document, positions = documents(idx, config.document_separator_id)
    return AttentionPlan(backend, idx, document, positions, windows)
