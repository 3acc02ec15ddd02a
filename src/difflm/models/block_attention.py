"""Block attention: the additive bias that makes a prompt + blocked answer sequence semi-causal.

Row b of a batch is `prompt_lengths[b]` prompt tokens followed by answer blocks of `block_length`
tokens (the last block may be shorter). Visibility, the same in training and in the sampler:

- a prompt token sees the prompt only (so its states do not depend on the answer and can be cached);
- an answer token sees the prompt and its own block, plus every earlier block when
  `see_earlier_blocks=True` (block-causal, as in semi-autoregressive decoding with a KV cache);
- padding keys (`attention_mask == 0`) are hidden from every query.

The result follows the project's attention-bias convention: 0 visible, -inf hidden, [B, 1, L, L].
"""

from __future__ import annotations

import torch

from difflm.errors import DifflmError

PROMPT_BLOCK = -1  # block index given to prompt positions


def block_ids(prompt_lengths: torch.Tensor, seq_len: int, block_length: int) -> torch.Tensor:
    """Block index of every position, PROMPT_BLOCK for the prompt: [B, L]."""
    positions = torch.arange(seq_len, device=prompt_lengths.device)[None, :]  # [1, L]
    prompt = prompt_lengths[:, None]  # [B, 1]
    answer_block = torch.div(positions - prompt, block_length, rounding_mode="floor")  # [B, L]
    return torch.where(positions < prompt, PROMPT_BLOCK, answer_block)  # [B, L]


def _check(prompt_lengths: torch.Tensor, seq_len: int, block_length: int, check_fit: bool) -> None:
    if prompt_lengths.dim() != 1:
        raise DifflmError(f"prompt_lengths must be 1-D [B], got shape {tuple(prompt_lengths.shape)}")
    if block_length < 1:
        raise DifflmError(f"block_length must be >= 1, got {block_length}")
    if prompt_lengths.numel() == 0:
        return
    if int(prompt_lengths.min()) < 0 or int(prompt_lengths.max()) > seq_len:
        raise DifflmError(f"prompt_lengths must lie in [0, seq_len={seq_len}]; shorten the prompts")
    if not check_fit:
        return
    gen_length = seq_len - int(prompt_lengths.max())
    if block_length > gen_length:
        raise DifflmError(
            f"block_length {block_length} is larger than the generation length {gen_length} "
            f"(seq_len {seq_len} minus the longest prompt); use block_length <= {gen_length}"
        )


def block_attention_bias(
    prompt_lengths: torch.Tensor,
    seq_len: int,
    block_length: int,
    *,
    see_earlier_blocks: bool = False,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    check_fit: bool = True,
) -> torch.Tensor:
    """Additive attention bias [B, 1, L, L] for prompt + answer blocks (see the module docstring).

    `prompt_lengths` is a LongTensor [B]; `attention_mask` [B, L] marks real tokens with 1 and
    padding with 0. Raises DifflmError when a block would not fit in the generation length, unless
    `check_fit=False` (training batches, whose answers may be shorter than a block).
    """
    _check(prompt_lengths, seq_len, block_length, check_fit)
    blocks = block_ids(prompt_lengths, seq_len, block_length)  # [B, L]
    query, key = blocks[:, :, None], blocks[:, None, :]  # [B, L, 1], [B, 1, L]
    visible = (key == query) | (key == PROMPT_BLOCK)  # [B, L, L]
    if see_earlier_blocks:
        visible = visible | (key < query)
    if attention_mask is not None:
        if attention_mask.shape != blocks.shape:
            raise DifflmError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(blocks.shape)}"
            )
        visible = visible & attention_mask.to(blocks.device).bool()[:, None, :]  # [B, L, L]
    bias = torch.zeros(visible.shape, dtype=dtype, device=blocks.device)  # [B, L, L]
    return bias.masked_fill(~visible, float("-inf"))[:, None]  # [B, 1, L, L]


# ---------------------------------------------------------------------------------------------
# Block diffusion (BD3-LM): blocks aligned at multiples of K from position 0


def _blocks(length: int, block_length: int, device: torch.device | str | None) -> torch.Tensor:
    if block_length < 1:
        raise DifflmError(f"block_length must be >= 1, got {block_length}")
    return torch.div(torch.arange(length, device=device), block_length, rounding_mode="floor")  # [L]


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill(~visible, float("-inf"))[None, None]  # [1, 1, Q, K]


def block_causal_bias(
    length: int,
    block_length: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[1, 1, L, L]: position i sees position j when block(j) <= block(i) (block = position // K).

    The sampling-time pattern of a block-diffusion model: earlier blocks are final (clean), the
    current block sees itself, nothing sees a later block, so cached keys of earlier blocks are exact.
    """
    blocks = _blocks(length, block_length, device)
    return _additive(blocks[None, :] <= blocks[:, None], dtype)


def bd3_training_bias(
    length: int,
    block_length: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[1, 1, 2L, 2L] for the training input [x_t ; x_0] (noisy copy first, both at positions 0..L-1).

    - noisy query in block b: the noisy keys of block b (block-diagonal) and the clean keys of
      blocks < b (offset block-causal) -- exactly what it sees when sampled block after block;
    - clean query in block b: the clean keys of blocks <= b (block-causal), never a noisy key, so
      the clean stream computes the states the sampler caches for finished blocks.
    K = 1 leaves each noisy token its own mask plus the clean prefix (next-token prediction);
    K = L is one block: full bidirectional masked diffusion on the noisy copy.
    """
    blocks = _blocks(length, block_length, device)
    query, key = blocks[:, None], blocks[None, :]  # [L, 1], [1, L]
    top = torch.cat([key == query, key < query], dim=1)  # noisy queries: [L, 2L]
    bottom = torch.cat([torch.zeros_like(top[:, :length]), key <= query], dim=1)  # clean queries
    return _additive(torch.cat([top, bottom], dim=0), dtype)  # [1, 1, 2L, 2L]


# ---------------------------------------------------------------------------------------------
# Lookahead rows: where a shifted BD3 model reads each block's first token
#
# A shifted model (logits of i from the output of i-1) would read block b's first token from the
# last row of block b-1, which must not see block b: that token would then be scored without
# the block's revealed tokens, as if it were always revealed first, which holds the ELBO bound
# up. A lookahead row is the token before the block once more, at its own position, seeing what
# the block's rows see (the clean earlier blocks and the noisy block); no row sees it.


def lookahead_positions(length: int, block_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of the lookahead rows [E]: the last position of every block but the last one."""
    if block_length < 1:
        raise DifflmError(f"block_length must be >= 1, got {block_length}")
    return torch.arange(block_length - 1, length - 1, block_length, device=device)


def bd3_lookahead_bias(
    length: int,
    block_length: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[1, 1, N, N] for the training input [x_t ; x_0 ; lookahead rows (E) ; one spare row],
    N = 2L + E + 1: `bd3_training_bias` for the two copies; lookahead row e (block e + 1) sees what
    that block's noisy rows see; no row sees a lookahead or the spare row. The spare row (seeing
    the clean first block) only gives the last lookahead row a successor, whose shifted logits
    are that lookahead row's output."""
    E = len(lookahead_positions(length, block_length))
    two = bd3_training_bias(length, block_length, device=device).isfinite()[0, 0]  # [2L, 2L]
    first_rows = torch.arange(1, E + 1, device=two.device) * block_length  # the blocks' first positions
    spare = torch.zeros(1, 2 * length, dtype=torch.bool, device=two.device)
    spare[0, length : length + min(block_length, length)] = True
    visible = torch.cat([two, two[first_rows], spare], dim=0)  # [N, 2L]
    hidden = torch.zeros(len(visible), E + 1, dtype=torch.bool, device=two.device)
    return _additive(torch.cat([visible, hidden], dim=1), dtype)  # [1, 1, N, N]
