"""DFGPT: a nanoGPT-shaped causal model that is either a plain GPT or a Diffusion Forcing denoiser.

Both run on the core `Transformer` (`models/transformer.py`), configured as nanoGPT: causal
pre-LN blocks (LayerNorm, tanh-GELU MLP), rotary positions (or nanoGPT's learned position
embeddings), final LayerNorm, tied LM head.

`use_diffusion_forcing=False`: the transformer itself, `model(idx) -> logits [B, L, V]`.

`use_diffusion_forcing=True`: the input is a sequence of noisy embeddings x_t [B, L, D], each token
at its own level k [B, L] (difflm.diffusion.gaussian).  A sinusoidal embedding of k is fused with the
token (added after an MLP, or concatenated and mapped back by an MLP), the trunk runs on these
embeddings (`Transformer.hidden`), and a linear head returns the objective's prediction in
embedding space: `model(x_t, k) -> [B, L, D]`.

Clean embeddings and rounding.  The clean target of token w is `sqrt(D) * E[w] / |E[w]|` (E the
trunk's token embedding): unit RMS per dimension, the scale of the unit-variance noise.  The fixed
norm removes the collapse where all embeddings shrink to 0 (noise-free x_t would make every
objective trivial), and the rounding cross-entropy, with logits `x0_hat . E[w] / |E[w]|` (the tied
embedding, normalised), keeps tokens apart.  Because every clean embedding has the same norm,
nearest-embedding decoding equals the argmax of these logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.diffusion.gaussian import GaussianConfig, GaussianDiffusion
from difflm.errors import DifflmError
from difflm.fields import opt
from difflm.models.layers import timestep_embedding
from difflm.models.transformer import Transformer, TransformerConfig

FUSIONS = ("add", "concat")
POSITIONS = ("rope", "learned")
ROPE_THETA = 10000.0
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, as nanoGPT


@dataclass
class DFGPTConfig:
    vocab_size: int = opt(256, "Vocabulary size (set from the tokenizer).")
    block_size: int = opt(256, "Longest sequence the model sees (learned positions).")
    n_layer: int = opt(6, "Transformer blocks.")
    n_head: int = opt(6, "Attention heads.")
    n_embd: int = opt(384, "Model width, also the embedding space diffusion runs in.")
    dropout: float = opt(0.0, "Dropout on embeddings, attention and residual branches.")
    bias: bool = opt(False, "Biases in Linear and LayerNorm layers.")
    use_diffusion_forcing: bool = opt(
        False, "False: plain GPT (next-token loss). True: Diffusion Forcing denoiser in embedding space."
    )
    positions: str = opt(
        "rope",
        "Rotary positions in attention, or nanoGPT's learned position embeddings.  Diffusion Forcing "
        "needs rope: a token at high noise must find its predecessor by attention alone, and with "
        "learned positions the one-step next-token NLL stayed at the letter-frequency level.",
        POSITIONS,
    )
    fusion: str = opt("add", "How the noise-level embedding joins the token: add, or concat + MLP.", FUSIONS)
    input_scale: float = opt(
        0.02,
        "The noisy embeddings enter the trunk times this: unit-RMS inputs would drown the learned "
        "positions (init std 0.02) and the model could not find its context; 0.02 matches the GPT's "
        "token embeddings.",
    )
    target_grad: bool = opt(
        True,
        "Let the diffusion loss move the embeddings through its clean target; false detaches the "
        "target, so the loss cannot shrink by pulling the embeddings of different tokens together.",
    )
    gaussian: GaussianConfig = opt(GaussianConfig(), "Gaussian diffusion (used when use_diffusion_forcing).")

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise DifflmError("vocab_size, block_size, n_layer, n_head and n_embd must all be >= 1")
        if self.n_embd % self.n_head or self.n_embd % 2:
            raise DifflmError(f"n_embd ({self.n_embd}) must be even and divisible by n_head ({self.n_head})")
        if self.positions not in POSITIONS:
            raise DifflmError(f"unknown positions {self.positions!r}; choose from {', '.join(POSITIONS)}")
        if self.fusion not in FUSIONS:
            raise DifflmError(f"unknown fusion {self.fusion!r}; choose from {', '.join(FUSIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise DifflmError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.input_scale <= 0:
            raise DifflmError(f"input_scale must be > 0, got {self.input_scale}")

    def trunk_config(self) -> TransformerConfig:
        """The core transformer this model runs on: nanoGPT's shape (LayerNorm, tanh-GELU MLP of
        4x width, tied head), causal, RoPE or learned positions."""
        return TransformerConfig(
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            mlp="gelu",
            dropout=self.dropout,
            causal=True,
            rope=self.positions == "rope",
            rope_theta=ROPE_THETA,
            learned_positions=self.positions == "learned",
            norm="layer",
            norm_eps=LAYER_NORM_EPS,
            bias=self.bias,
            tie_embeddings=True,
        )


class DFGPT(nn.Module):
    """Diffusion Forcing's GPT: the core `Transformer` (causal, LayerNorm, GELU, tied head) with,
    for Diffusion Forcing, a per-token level embedding in front and an embedding-space head on top.

    Continuous (embedding-space) noise makes it a `SequenceModel` but no masked `Denoiser`
    (models/protocol.py); its training loss is `train/objectives.py:DiffusionForcingObjective`.
    """

    legacy_keys = (  # names before DFGPT ran on the core Transformer (2026-12-01); checkpoint.load_weights
        (r"^wte\.", "trunk.tok_emb."),
        (r"^wpe\.", "trunk.pos_emb."),
        (r"^ln_f\.", "trunk.norm_f."),
        (r"^lm_head\.", "trunk.lm_head."),
        (r"^blocks\.(\d+)\.ln_1\.", r"trunk.blocks.\1.norm1."),
        (r"^blocks\.(\d+)\.ln_2\.", r"trunk.blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.attn\.c_attn\.", r"trunk.blocks.\1.attn.qkv."),
        (r"^blocks\.(\d+)\.attn\.c_proj\.", r"trunk.blocks.\1.attn.out_proj."),
        (r"^blocks\.(\d+)\.mlp\.", r"trunk.blocks.\1.mlp."),
    )

    def __init__(self, config: DFGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Transformer(config.trunk_config())  # GPT-2 init, as nanoGPT
        if config.use_diffusion_forcing:
            D = config.n_embd
            self.diffusion = GaussianDiffusion(config.gaussian)
            fuse_in = D if config.fusion == "add" else 2 * D
            self.fuse = nn.Sequential(
                nn.Linear(fuse_in, D, bias=config.bias),
                nn.GELU(approximate="tanh"),
                nn.Linear(D, D, bias=config.bias),
            )
            self.head = nn.Linear(D, D, bias=config.bias)
            for layer in (self.fuse[0], self.fuse[2], self.head):
                nn.init.normal_(layer.weight, mean=0.0, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    @property
    def max_length(self) -> int:
        return self.config.block_size

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        """Plain GPT: `model(idx [B, L]) -> logits [B, L, V]`.  Diffusion Forcing: `model(x_t [B, L, D], k [B, L])`."""
        if not self.config.use_diffusion_forcing:
            if k is not None:
                raise DifflmError("noise levels k were given but use_diffusion_forcing is False")
            return self.trunk(x)  # [B, L, V]
        if k is None:
            raise DifflmError("a Diffusion Forcing model needs per-token noise levels k [B, L]")
        return self.head(self.trunk.hidden(self._fuse(x, k)))  # [B, L, D]

    def _fuse(self, x_t: Tensor, k: Tensor) -> Tensor:
        """Join each noisy token [B, L, D] with a sinusoidal embedding of its integer level k [B, L]."""
        B, L, D = x_t.shape
        level = timestep_embedding(k.reshape(-1), D, scale=1.0).view(B, L, D).to(x_t.dtype)  # [B, L, D]
        x_t = x_t * self.config.input_scale
        if self.config.fusion == "add":
            return x_t + self.fuse(level)
        return self.fuse(torch.cat([x_t, level], dim=-1))

    # ------------------------------------------------------------------ embedding space

    def clean_embedding_matrix(self) -> Tensor:
        """[V, D] clean embeddings: token embeddings scaled to norm sqrt(D) (unit RMS per dimension)."""
        return F.normalize(self.trunk.tok_emb.weight, dim=-1) * math.sqrt(self.config.n_embd)

    def embed_clean(self, idx: Tensor) -> Tensor:
        """Tokens [B, L] -> clean embeddings x0 [B, L, D]."""
        return F.normalize(self.trunk.tok_emb(idx), dim=-1) * math.sqrt(self.config.n_embd)

    def round_logits(self, x0_hat: Tensor) -> Tensor:
        """Token logits [B, L, V] of predicted embeddings: x0_hat projected on the normalised tied embedding."""
        return x0_hat @ F.normalize(self.trunk.tok_emb.weight, dim=-1).T

    def decode_nearest(self, x: Tensor) -> Tensor:
        """Embeddings [B, L, D] -> ids [B, L] of the nearest clean embedding (squared distance)."""
        E = self.clean_embedding_matrix()  # [V, D]
        dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ E.T + E.pow(2).sum(-1)  # [B, L, V]
        return dist.argmin(-1)
