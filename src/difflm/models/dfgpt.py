"""DFGPT: a nanoGPT-style causal transformer that is either a plain GPT or a Diffusion Forcing denoiser.

`use_diffusion_forcing=False`: token embeddings, causal pre-LN blocks with rotary positions (or
nanoGPT's learned position embeddings), final LayerNorm and a tied LM head; `model(idx) -> logits [B, L, V]`, `model.next_token_loss(idx, targets)`.

`use_diffusion_forcing=True`: the input is a sequence of noisy embeddings x_t [B, L, D], each token
at its own level k [B, L] (difflm.diffusion.gaussian).  A sinusoidal embedding of k is fused with the
token (added after an MLP, or concatenated and mapped back by an MLP), the same causal blocks run,
and a linear head returns the objective's prediction in embedding space: `model(x_t, k) -> [B, L, D]`.

Clean embeddings and rounding.  The clean target of token w is `sqrt(D) * wte[w] / |wte[w]|`:
unit RMS per dimension, the scale of the unit-variance noise.  Gradients flow into `wte` through
both the input and the target (`target_grad=False`: the input and the rounding head only); the fixed norm removes the collapse where all embeddings shrink to 0
(noise-free x_t would make every objective trivial), and the rounding cross-entropy, with logits
`x0_hat . wte[w] / |wte[w]|` (the tied embedding, normalised), keeps tokens apart.  Because every
clean embedding has the same norm, nearest-embedding decoding equals the argmax of these logits.
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
from difflm.models.layers import GeluMLP, apply_rope, rope_cos_sin, timestep_embedding

FUSIONS = ("add", "concat")
POSITIONS = ("rope", "learned")
ROPE_THETA = 10000.0


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DFGPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout, self.rope = cfg.n_head, cfg.dropout, cfg.positions == "rope"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = (
            self.c_attn(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        )  # [B, H, L, hs]
        if self.rope:
            cos, sin = rope_cos_sin(0, L, C // self.n_head, ROPE_THETA, x.device)  # [L, hs]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [B, H, L, hs]
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, L, C)))


class Block(nn.Module):
    def __init__(self, cfg: DFGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = GeluMLP(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias, dropout=cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DFGPT(nn.Module):
    """Diffusion Forcing's GPT: continuous (embedding-space) noise, so a `SequenceModel` but no
    masked `Denoiser` (models/protocol.py)."""

    def __init__(self, config: DFGPTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, D)
        self.wpe = nn.Embedding(config.block_size, D) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(D, bias=config.bias)
        if config.use_diffusion_forcing:
            self.diffusion = GaussianDiffusion(config.gaussian)
            fuse_in = D if config.fusion == "add" else 2 * D
            self.fuse = nn.Sequential(
                nn.Linear(fuse_in, D, bias=config.bias),
                nn.GELU(approximate="tanh"),
                nn.Linear(D, D, bias=config.bias),
            )
            self.head = nn.Linear(D, D, bias=config.bias)
        else:
            self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("c_proj.weight", "mlp.out_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ shared trunk

    @property
    def max_length(self) -> int:
        return self.config.block_size

    def _trunk(self, h: Tensor) -> Tensor:
        """Positions, causal blocks, final norm: [B, L, D] -> [B, L, D]."""
        L = h.shape[1]
        if L > self.config.block_size:
            raise DifflmError(f"sequence length {L} > block_size {self.config.block_size}; crop the input")
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(L, device=h.device))
        h = self.drop(h)  # [B, L, D]
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        """Plain GPT: `model(idx [B, L]) -> logits [B, L, V]`.  Diffusion Forcing: `model(x_t [B, L, D], k [B, L])`."""
        if not self.config.use_diffusion_forcing:
            if k is not None:
                raise DifflmError("noise levels k were given but use_diffusion_forcing is False")
            return self.lm_head(self._trunk(self.wte(x)))  # [B, L, V]
        if k is None:
            raise DifflmError("a Diffusion Forcing model needs per-token noise levels k [B, L]")
        return self.head(self._trunk(self._fuse(x, k)))  # [B, L, D]

    def _fuse(self, x_t: Tensor, k: Tensor) -> Tensor:
        """Join each noisy token [B, L, D] with a sinusoidal embedding of its integer level k [B, L]."""
        B, L, D = x_t.shape
        level = timestep_embedding(k.reshape(-1), D, scale=1.0).view(B, L, D).to(x_t.dtype)  # [B, L, D]
        x_t = x_t * self.config.input_scale
        if self.config.fusion == "add":
            return x_t + self.fuse(level)
        return self.fuse(torch.cat([x_t, level], dim=-1))

    # ------------------------------------------------------------------ plain GPT

    def next_token_loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of logits(idx) against targets [B, L] (-100 = ignored)."""
        if self.config.use_diffusion_forcing:
            raise DifflmError("next_token_loss needs use_diffusion_forcing=False; use diffusion_loss")
        logits = self(idx)  # [B, L, V]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ embedding space

    def clean_embedding_matrix(self) -> Tensor:
        """[V, D] clean embeddings: wte rows scaled to norm sqrt(D) (unit RMS per dimension)."""
        return F.normalize(self.wte.weight, dim=-1) * math.sqrt(self.config.n_embd)

    def embed_clean(self, idx: Tensor) -> Tensor:
        """Tokens [B, L] -> clean embeddings x0 [B, L, D]."""
        return F.normalize(self.wte(idx), dim=-1) * math.sqrt(self.config.n_embd)

    def round_logits(self, x0_hat: Tensor) -> Tensor:
        """Token logits [B, L, V] of predicted embeddings: x0_hat projected on the normalised tied embedding."""
        return x0_hat @ F.normalize(self.wte.weight, dim=-1).T

    def decode_nearest(self, x: Tensor) -> Tensor:
        """Embeddings [B, L, D] -> ids [B, L] of the nearest clean embedding (squared distance)."""
        E = self.clean_embedding_matrix()  # [V, D]
        dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ E.T + E.pow(2).sum(-1)  # [B, L, V]
        return dist.argmin(-1)

    # ------------------------------------------------------------------ Diffusion Forcing loss

    def diffusion_loss(
        self,
        idx: Tensor,
        generator: torch.Generator | None,
        levels: Tensor | None = None,
        noise: Tensor | None = None,
        net: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Diffusion Forcing training loss of tokens idx [B, L] with independent per-token levels.

        levels [B, L] (default: uniform on 0..T-1 from `generator`) may be fixed, e.g. all 0 to
        measure `rounding_nll` on nearly clean input (the likelihood-style metric).  noise [B, L, D]
        (default: drawn from `generator`) lets a trainer draw both on the whole global batch, so
        they do not depend on the micro-batch split.  `net` is what the denoiser forward runs
        through (default self; a DistributedDataParallel wrapper of self, so gradients sync).  The rounding
        CE uses x0_hat clamped to +-clip_noise: for pred_noise at the highest levels,
        x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a) amplifies errors by up to 1/sqrt(a).
        Returns (diffusion loss + rounding_weight * rounding CE, detached metrics).
        """
        if not self.config.use_diffusion_forcing:
            raise DifflmError("diffusion_loss needs use_diffusion_forcing=True; use next_token_loss")
        diff, gcfg = self.diffusion, self.config.gaussian
        x0 = self.embed_clean(idx)  # [B, L, D]
        if (levels is None or noise is None) and generator is None:
            raise DifflmError("diffusion_loss needs a generator unless both levels and noise are given")
        if levels is None:
            levels = torch.randint(0, gcfg.timesteps, idx.shape, generator=generator, device=generator.device)
        k = levels.to(idx.device)  # [B, L]
        if noise is None:
            noise = diff.randn(tuple(x0.shape), generator, x0.device)  # [B, L, D]
        noise = noise.to(x0.device)
        x_t = diff.q_sample(x0, k, noise)
        pred = (net or self)(x_t, k)  # [B, L, D]
        target = x0 if self.config.target_grad else x0.detach()
        loss_diffusion = diff.training_loss(pred, target, noise, k)
        x0_hat, _ = diff.split_prediction(pred, x_t, k)
        logits = self.round_logits(x0_hat.clamp(-gcfg.clip_noise, gcfg.clip_noise))  # [B, L, V]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
        loss = loss_diffusion + gcfg.rounding_weight * nll
        return loss, {"diffusion_loss": loss_diffusion.detach(), "rounding_nll": nll.detach()}
