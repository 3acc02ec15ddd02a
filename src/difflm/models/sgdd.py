"""SGDD: a small masked-diffusion decoder that writes text back from one sentence vector.

Semantic-vector-guided discrete diffusion. A frozen sentence encoder (MiniLM by default, see
`difflm.models.encoder`) turns a text into one vector; this decoder reconstructs the text (phase 1)
or writes a paraphrase (phase 2) by iterative unmasking, conditioned on that vector through
AdaLN-Zero (the transformer's `cond_dim` path, whose `cond_proj` maps semantic_dim -> n_embd) and,
optionally, cross-attention to `cond_tokens` memory tokens.

What is here, and what is not:

- `SGDD` holds the trainable `SemanticHead` (whitening buffers, VIB), the decoder `Transformer`
  and a small length head. The frozen encoder is deliberately *not* a submodule: it is loaded by
  the system / sampler from `config.encoder`, so it is in neither the state_dict nor the optimizer.
- The decoder's vocabulary is the encoder tokenizer's (MiniLM WordPiece, [MASK] = 103, [PAD] = 0);
  sequences are the text's tokens without [CLS]/[SEP], right-padded with [PAD] to `block_size`.
  Pads are attended out and never scored: the length is chosen before decoding (length head).
- Time: with `time_conditioning`, t given to AdaLN is the masked fraction of the real (non-pad)
  tokens, computed from the input. Training and sampling thus condition on the same quantity,
  and the sampling engine needs no notion of time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.errors import DifflmError
from difflm.fields import opt
from difflm.models.bert_decoder import BertDecoder
from difflm.models.conditioning import Conditioning
from difflm.models.encoder import EncoderConfig, SemanticHead
from difflm.models.transformer import MLPS, Transformer, TransformerConfig

EMBEDDING_INITS = ("random", "encoder_pca", "encoder_projection")
DECODERS = ("scratch", "encoder")
INIT_STD = 0.02  # the transformer's normal init; projected encoder embeddings are rescaled to it


@dataclass
class SGDDConfig:
    """The SGDD decoder (lightweight seed setting: 256 wide, 2 layers, 4 heads, FFN 1024)."""

    decoder: str = opt(
        "scratch",
        "'scratch': the core pre-norm transformer, randomly initialised (the seed's lightweight "
        "decoder); 'encoder': a BERT stack shaped like the frozen encoder and started from its "
        "pretrained weights (n_layer, n_head, n_embd, ffn_hidden are filled in from it; "
        f"mlp, learned_positions, tie_embeddings and embedding_init do not apply); one of {DECODERS}",
    )
    vocab_size: int = opt(1, "decoder vocabulary = the encoder tokenizer's (filled in)")
    block_size: int = opt(64, "max_token_length: text tokens per sequence, padded with [PAD]")
    n_layer: int = opt(2, "decoder blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(256, "decoder width (hidden_dim); != semantic_dim is fine")
    ffn_hidden: int = opt(1024, "MLP hidden width")
    mlp: str = opt("gelu", f"MLP kind: one of {sorted(MLPS)}")
    dropout: float = opt(0.1, "dropout in the decoder")
    time_conditioning: bool = opt(True, "AdaLN-Zero on t (the masked fraction of real tokens) as well")
    cond_tokens: int = opt(0, "also cross-attend to the vector as this many memory tokens (0 = off)")
    learned_positions: bool = opt(
        True,
        "learned absolute positions besides RoPE: decoding starts from all masks, where RoPE "
        "alone cannot tell positions apart",
    )
    tie_embeddings: bool = opt(True, "share the output head with the input embedding")
    embedding_init: str = opt(
        "encoder_pca",
        "token embeddings at the start of phase 1: 'random' (normal 0.02), 'encoder_pca' (the "
        "encoder's table projected on its top principal axes) or 'encoder_projection' (a fixed "
        f"random projection); one of {EMBEDDING_INITS}",
    )
    length_head: bool = opt(True, "predict the output length from the vector (else the caller gives it)")
    encoder: EncoderConfig = opt(EncoderConfig(), "the frozen sentence encoder and its head")
    encoder_dim: int = opt(384, "width of the encoder's vectors (checked on load)")
    mask_token_id: int | None = opt(None, "[MASK] id (filled in)")
    pad_token_id: int | None = opt(None, "[PAD] id (filled in)")

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise DifflmError(f"model.decoder={self.decoder!r}: use one of {DECODERS}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise DifflmError(f"model.embedding_init={self.embedding_init!r}: use one of {EMBEDDING_INITS}")
        if self.encoder_dim < 1:
            raise DifflmError(f"model.encoder_dim must be positive, got {self.encoder_dim}")
        self.decoder_config()  # validates the transformer fields with its own messages

    @property
    def semantic_dim(self) -> int:
        """Width of the vector the decoder sees (after the optional VIB)."""
        return (self.encoder.vib_dim or self.encoder_dim) if self.encoder.vib else self.encoder_dim

    def decoder_config(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            ffn_hidden=self.ffn_hidden,
            mlp=self.mlp,
            dropout=self.dropout,
            time_conditioning=self.time_conditioning,
            cond_dim=self.semantic_dim,
            cond_tokens=self.cond_tokens,
            learned_positions=self.learned_positions,
            tie_embeddings=self.tie_embeddings,
            mask_token_id=self.mask_token_id,
            pad_token_id=self.pad_token_id,
        )


class SGDD(nn.Module):
    """Denoiser conditioned on a sentence vector: (ids [B, L], vector [B, encoder_dim]) -> logits."""

    supports_kv_cache = False  # SGDD decodes one block: a cache would have nothing to reuse
    supports_logits_at = True
    logits_shift = 0

    def __init__(self, config: SGDDConfig) -> None:
        super().__init__()
        if config.pad_token_id is None or config.mask_token_id is None:
            raise DifflmError(
                "SGDD needs model.pad_token_id and model.mask_token_id (set from the tokenizer)"
            )
        self.config = config
        self.mask_token_id = config.mask_token_id
        self.head = SemanticHead(config.encoder, config.encoder_dim)
        self.decoder = build_decoder(config)
        width = config.n_embd
        self.length_head = (
            nn.Sequential(
                nn.Linear(config.semantic_dim, width), nn.GELU(), nn.Linear(width, config.block_size)
            )
            if config.length_head
            else None
        )

    @property
    def max_length(self) -> int:
        return self.config.block_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def semantic(self, z: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encoder vectors [B, D] -> (conditioning vectors [B, semantic_dim], VIB KL or 0).

        `noise` [B, semantic_dim] is the VIB's standard-normal draw, made by the caller (the objective's
        `prepare`, so it depends only on (seed, step)); None gives the mean, as at inference.
        """
        if z.dim() != 2 or z.shape[1] != self.config.encoder_dim:
            raise DifflmError(
                f"semantic vectors must be [B, {self.config.encoder_dim}], got {tuple(z.shape)}"
            )
        mean, kl = self.head(z.float(), sample=False)  # [B, K], scalar
        if noise is None or self.head.vib is None:
            return mean, kl
        whitened = self.head.whitening(z.float()) if self.head.whitening is not None else z.float()
        return mean + self.head.vib.log_sigma(whitened).exp() * noise, kl  # [B, K]

    def mask_fraction(self, input_ids: Tensor) -> Tensor:
        """t per row [B]: the masked share of the real (non-pad) tokens."""
        real = input_ids != self.config.pad_token_id  # [B, L]
        masked = (input_ids == self.mask_token_id) & real
        return masked.sum(1) / real.sum(1).clamp(min=1)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_bias: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        cond_drop: Tensor | None = None,
        cond_noise: Tensor | None = None,
        logits_at: Tensor | None = None,
        head: tuple[Tensor, Tensor | None] | None = None,
        conditioning: Conditioning | None = None,
        cond_rows: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, L, V], or packed [N, V] at the N true positions of `logits_at` [B, L]; with
        `head` (from `output_rows`) only its K tokens are scored (logits [..., K]).
        conditioning, cond_rows [B]: from `conditioning`, the rows of this batch in it (cond,
        cond_drop and cond_noise are then unused: the rows already are the vectors or the null one).

        cond: encoder vectors [B, encoder_dim]; None = unconditional (the learned null vector).
        cond_drop: bool [B], rows that get the null vector instead (classifier-free guidance).
        t: ignored in favour of the masked fraction when None (see the module docstring).
        """
        c = None
        if cond is not None and conditioning is None:
            c, _ = self.semantic(cond, cond_noise)  # [B, K]
            if cond_drop is not None:
                null = self.decoder.null_cond.to(c.dtype).expand_as(c)
                c = torch.where(cond_drop.bool()[:, None], null, c)  # [B, K]
        if t is None and self.config.time_conditioning:
            t = self.mask_fraction(input_ids)  # [B]
        kw = {"attention_bias": attention_bias, "t": t, "cond": c, "logits_at": logits_at}
        if conditioning is not None:
            kw |= {"conditioning": conditioning, "cond_rows": cond_rows}
        return self.decoder(input_ids, **kw, head=head)

    @torch.no_grad()
    def conditioning(self, vectors: Tensor, t_grid: Tensor | None = None, null: bool = True) -> Conditioning:
        """What the decoder computes from encoder vectors [B, D] alone (models/conditioning.py),
        for rows 0..B-1 (the vectors) and, with `null` (guidance needs it), B (the unconditional
        null vector), at every t of t_grid."""
        rows = self.semantic(vectors)[0]
        if null:
            rows = torch.cat([rows, self.decoder.null_cond[None].to(vectors.dtype)])
        return self.decoder.conditioning(rows, t_grid)

    def t_grid(self, real: Tensor) -> Tensor:
        """Every t that rows with real-token mask real [B, L] can have: k / n for k = 0..n, n the
        row's real count, computed as `mask_fraction` computes it (so the floats match exactly)."""
        counts = real.sum(1).clamp(min=1).unique()
        return torch.cat([torch.arange(int(n) + 1, device=real.device) / n for n in counts]).unique()

    def top_tokens(self, h: Tensor, k: int) -> Tensor:
        """The k most likely token ids [N, k] of hidden states from a `hidden_head` forward."""
        return self.decoder.top_tokens(h, k)

    def int8_(self) -> int:
        """The decoder's linear layers in int8, in place, for decoding on the CPU
        (models/quantize.py); returns how many. The semantic and length heads stay float32."""
        return self.decoder.int8_()

    def output_rows(self, vocab: Tensor) -> tuple[Tensor, Tensor | None]:
        """The `head` that scores only the token ids vocab [K], in that order."""
        return self.decoder.output_rows(vocab)

    def hidden_head(self) -> tuple[Tensor, None]:
        """A `head` under which a forward returns the final hidden states [..., C] instead of
        logits (an identity projection, exact), for `project_hidden` to score later."""
        weight = self.decoder.tok_emb.weight
        return torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device), None

    def project_hidden(self, h: Tensor, head: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """Logits of hidden states from a `hidden_head` forward: the same as that forward with
        `head` (None: the whole vocabulary) would have returned."""
        return self.decoder.project_hidden(h, head)

    def length_logits(self, z: Tensor) -> Tensor:
        """[B, block_size] scores of lengths 1..block_size, from the mean conditioning vector."""
        if self.length_head is None:
            raise DifflmError(
                "this SGDD model has no length head (model.length_head=false): pass the lengths"
            )
        return self.length_head(self.semantic(z)[0])

    @torch.no_grad()
    def predict_length(self, z: Tensor) -> Tensor:
        """Most likely token count per vector, [B] in 1..block_size."""
        return self.length_logits(z).argmax(-1) + 1

    def aux_losses(self, z: Tensor, lengths: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(VIB KL, length cross-entropy) of a batch; zero where the part is absent."""
        _, kl = self.semantic(z, noise)
        if self.length_head is None:
            return kl, kl.new_zeros(())
        return kl, F.cross_entropy(
            self.length_logits(z).float(), (lengths - 1).clamp(0, self.config.block_size - 1)
        )

    @torch.no_grad()
    def init_embeddings(self, table: Tensor, method: str, generator: torch.Generator | None = None) -> None:
        """Set the (tied) token embeddings from the encoder's table [V, D] (see `project_table`)."""
        emb = self.decoder.tok_emb.weight
        if table.shape[0] != emb.shape[0]:
            raise DifflmError(
                f"encoder table has {table.shape[0]} tokens but the decoder vocabulary {emb.shape[0]}: "
                "the decoder must use the encoder's tokenizer"
            )
        emb.copy_(project_table(table, emb.shape[1], method, generator))


class Shortlisted(nn.Module):
    """An SGDD decoder whose whole vocabulary is a shortlist of K token ids: its inputs and logits
    are indices into `vocab` [K] (sorted), so the sampling engine decodes over K tokens.

    With the whole vocabulary every step reads the [V, C] output matrix and runs guidance, softmax
    and the argmax over V logits; a shortlist (`evaluate/sgdd_decode.shortlist`) of the tokens the
    decoder could write makes all of that K wide, and its head rows are gathered once here. The
    shortlist must hold every id the inputs use ([MASK], [PAD], fixed context tokens)."""

    supports_kv_cache = False
    supports_logits_at = True
    logits_shift = 0

    def __init__(self, model: SGDD, vocab: Tensor) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab.unique()  # sorted
        self.mask_token_id = int(self.index(torch.tensor([model.mask_token_id], device=vocab.device)))
        self.head = model.output_rows(self.vocab)  # gathered once, not at every step
        self._answer: tuple[Tensor, ...] | None = None

    def remember(
        self,
        input_ids: Tensor,
        logits_at: Tensor,
        bias: Tensor | None,
        cond_rows: Tensor,
        logits: Tensor,
        uncond: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Answer the next call with logits [N, K] where it is this forward: shortlist indices
        input_ids [B, L], packed at logits_at [B, L], attention bias `bias`, conditioning rows
        cond_rows [B]. The shortlist comes from the decode's first unguided forward, so that step
        need not run again. Under guidance the call has B more rows, the same inputs on other
        conditioning rows: `uncond` = (their cond_rows [B], their logits [N, K]) answers them too;
        without it they run. Any other call runs the model."""
        self._answer = (input_ids, logits_at, bias, cond_rows, logits, uncond)

    def _remembered(self, input_ids: Tensor, kw: dict) -> Tensor | None:
        answer, self._answer = self._answer, None  # good for the next call only
        if answer is None or len(input_ids) not in (len(answer[0]), 2 * len(answer[0])):
            return None
        ids, at, bias, rows, logits, uncond = answer
        B, n = len(ids), len(input_ids)

        def part(v, rows: slice):  # the per-row keyword arguments of these rows
            return v[rows] if isinstance(v, Tensor) and v.dim() > 0 and len(v) == n else v

        def same(these: slice, cond_rows: Tensor) -> bool:  # these rows are the remembered forward's
            kw_rows = {k: part(v, these) for k, v in kw.items()}
            return (
                torch.equal(input_ids[these], ids)
                and _equal(kw_rows.get("logits_at"), at)
                and _equal(kw_rows.get("cond_rows"), cond_rows)
                and _equal(kw_rows.get("attention_bias"), bias)
            )

        if not same(slice(0, B), rows):
            return None
        if n == B:
            return logits
        if uncond is not None and same(slice(B, n), uncond[0]):
            return torch.cat([logits, uncond[1]])
        rest = {k: part(v, slice(B, n)) for k, v in kw.items()}
        return torch.cat([logits, self.model(self.vocab[input_ids[B:]], head=self.head, **rest)])

    @property
    def max_length(self) -> int:
        return self.model.max_length

    def index(self, ids: Tensor) -> Tensor:
        """Token ids -> their indices in the shortlist (a DifflmError for an id not in it)."""
        at = torch.searchsorted(self.vocab, ids).clamp(max=len(self.vocab) - 1)
        if not torch.equal(self.vocab[at], ids):
            raise DifflmError("the shortlist lacks token ids its inputs use: put them in the shortlist")
        return at

    def forward(self, input_ids: Tensor, **kw) -> Tensor:
        """Logits [..., K] for shortlist indices input_ids; keyword arguments as `SGDD.forward`."""
        remembered = self._remembered(input_ids, kw)
        if remembered is not None:
            return remembered
        return self.model(self.vocab[input_ids], head=self.head, **kw)


def _equal(a: Tensor | None, b: Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def build_decoder(config: SGDDConfig) -> Transformer | BertDecoder:
    if config.decoder == "scratch":
        return Transformer(config.decoder_config())
    return BertDecoder(
        vocab_size=config.vocab_size,
        block_size=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        ffn_hidden=config.ffn_hidden,
        cond_dim=config.semantic_dim,
        dropout=config.dropout,
        time_conditioning=config.time_conditioning,
        cond_tokens=config.cond_tokens,
    )


def project_table(table: Tensor, dim: int, method: str, generator: torch.Generator | None = None) -> Tensor:
    """Project a token-embedding table [V, D] to [V, dim] with std INIT_STD.

    encoder_pca: centre, keep the top-`dim` principal axes (SVD), so nearby tokens of the encoder
    stay nearby; when dim > D the extra columns are normal noise at INIT_STD.
    encoder_projection: a fixed Gaussian projection [D, dim] (Johnson-Lindenstrauss: distances are
    roughly kept), works for any dim. `random`: a plain normal(0, INIT_STD) table.
    """
    vocab, d = table.shape
    if method == "random":
        return torch.randn(vocab, dim, generator=generator) * INIT_STD
    x = table.double() - table.double().mean(0)  # [V, D]
    if method == "encoder_pca":
        _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh [D, D], rows = principal axes
        k = min(dim, d)
        out = x @ vh[:k].T  # [V, k]
        out = out / out.std() * INIT_STD
        if dim > d:
            out = torch.cat(
                [out, torch.randn(vocab, dim - d, generator=generator, dtype=out.dtype) * INIT_STD], 1
            )
    elif method == "encoder_projection":
        proj = torch.randn(d, dim, generator=generator, dtype=x.dtype) / math.sqrt(d)  # [D, dim]
        out = x @ proj  # [V, dim]
        out = out / out.std() * INIT_STD
    else:
        raise DifflmError(f"unknown embedding init {method!r}: use one of {EMBEDDING_INITS}")
    return out.float()
