"""lm-evaluation-harness adapter: a difflm checkpoint or published snapshot as lm-eval's `difflm` model.

`DifflmLM` answers lm-eval's requests for any full-attention masked-diffusion model that
`load_pretrained` loads (difflm checkpoints, LLaDA / Dream / Qwen3-LLaDA snapshots):

- generate_until: the one unmasking engine (`sampling.unmask.generate`) with the settings of
  `HarnessSettings` (gen length, steps, block length, threshold, KV cache, ...), `batch_size` rows at
  a time. A task's `max_gen_toks` lowers the length; the text is cut at the first EOS token, then
  before the first of the task's `until` strings.
- loglikelihood: the Monte-Carlo ELBO of the continuation (`likelihood.continuation_elbo`, LLaDA's
  estimator: l ~ U{1..L} masked tokens weighted by L/l), `mc_num` draws from a generator seeded by
  (seed, the request's tokens), so a request gets the same number whatever it is evaluated with.
- loglikelihood_rolling (perplexity tasks): refused, see `loglikelihood_rolling`.

Registration: lm-eval 0.4.13 looks models up in its own registry only (no entry points, no plugin
path), so the stock `lm_eval` script cannot see a model it never imported. Importing this module
registers `difflm`; `python -m difflm.evaluate.lm_eval ARGS` is lm-eval's own command line (same
arguments) with the name registered, and `difflm eval DIR --tasks ...` calls `simple_evaluate` with
a `DifflmLM`. lm-eval is the optional extra `difflm[lmeval]`; only those two import this module.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from difflm.errors import DifflmError
from difflm.evaluate.likelihood import continuation_elbo
from difflm.fields import opt
from difflm.models.protocol import max_length_of
from difflm.pretrained import Pretrained, load_pretrained
from difflm.sampling.settings import CACHE_MODES, REMASKING, SampleConfig
from difflm.sampling.unmask import generate
from difflm.serve.models import DIFFUSION_TASKS

MODEL_NAME = "difflm"


@dataclass
class HarnessSettings:
    """How `DifflmLM` generates and scores: lm-eval's model_args besides pretrained, device, batch_size."""

    gen_length: int = opt(256, "Tokens generated per request (a task's max_gen_toks lowers it).")
    steps: int | None = opt(
        None,
        "Denoising steps for gen_length tokens (null: one token per step; 0 with a threshold: each "
        "block until it is filled); a shorter generation gets proportionally fewer.",
    )
    block_length: int | None = opt(32, "Semi-autoregressive blocks of this many tokens (null = one block).")
    threshold: float | None = opt(None, "Also reveal every token whose confidence is >= this (Fast-dLLM).")
    cache: str = opt("none", "KV cache within a block (dual: prefix and suffix).", CACHE_MODES)
    remasking: str = opt("low_confidence", "Which masked positions to reveal first.", REMASKING)
    temperature: float = opt(0.0, "Sampling temperature (0 = greedy).")
    mc_num: int = opt(128, "Monte-Carlo draws per loglikelihood request (LLaDA's evaluation uses 128).")
    seed: int = opt(1234, "Seed of the ELBO draws and of sampling at temperature > 0.")

    def __post_init__(self) -> None:
        if self.mc_num < 1:
            raise DifflmError(f"mc_num must be >= 1 (Monte-Carlo draws per request), got {self.mc_num}")
        self.sample_config(self.gen_length, eos_token_id=None)  # the engine's checks, before loading

    def sample_config(self, length: int, eos_token_id: int | None) -> SampleConfig:
        """The engine's settings for `length` tokens; with an EOS id, decoding stops once every row
        has finished its answer (the text after EOS is dropped anyway)."""
        block = None if self.block_length is None else min(self.block_length, length)
        n_blocks = math.ceil(length / (block or length))
        steps = length if self.steps is None else self.steps
        if steps > 0 and length != self.gen_length:  # same tokens per step as at gen_length
            steps = min(length, max(n_blocks, round(steps * length / self.gen_length)))
        return SampleConfig(
            gen_length=length,
            steps=steps,
            block_length=block,
            threshold=self.threshold,
            cache=self.cache,
            remasking=self.remasking,
            temperature=self.temperature,
            eos_token_id=eos_token_id,
            eos_mode="none" if eos_token_id is None else "stop",
        )


class DifflmLM(TemplateLM):
    """lm-eval's `difflm` model: `pretrained` is a difflm checkpoint (step or run folder) or a
    published snapshot folder, loaded on `device` (default cuda when there is one), or a loaded
    `Pretrained`, used where it is; `batch_size` is rows per forward (prompts generated together, or
    ELBO draws of one request); the other model_args are `HarnessSettings`. `max_batch_size` is
    accepted because lm-eval always passes it; automatic batch sizes are not supported."""

    def __init__(
        self,
        pretrained: str | Pretrained,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(settings.keys() - {f.name for f in fields(HarnessSettings)})
        if unknown:
            raise DifflmError(
                f"unknown model_args {', '.join(unknown)}; difflm takes pretrained, device, batch_size, "
                f"{', '.join(f.name for f in fields(HarnessSettings))}"
            )
        self.settings = HarnessSettings(**settings)
        self.rows = _rows_per_forward(batch_size)
        if not isinstance(pretrained, Pretrained):
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            pretrained = load_pretrained(pretrained, device)
        check_diffusion(pretrained)
        self.pre = pretrained
        self._device = next(pretrained.model.parameters()).device
        self.max_length = max_length_of(pretrained.model)
        self.tokenizer = getattr(pretrained.tokenizer, "tok", None)  # the HF tokenizer: chat templates

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.pre.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`; special tokens are never added (chat templates carry their own)."""
        return self.pre.tokenizer.encode(string)

    @property
    def tokenizer_name(self) -> str:
        return str(self.pre.path).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise DifflmError(
                f"the tokenizer of {self.pre.path} has no chat template; drop --apply_chat_template"
            )
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ requests

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Requests (context, gen_kwargs): `until` (str or list) and `max_gen_toks` are read; sampling
        follows the model_args. Requests of one length are generated `batch_size` at a time."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            length = request.args[1].get("max_gen_toks", self.settings.gen_length)
            by_length[min(length, self.settings.gen_length)].append(index)
        texts: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for length, indices in by_length.items():
            cfg = self.settings.sample_config(length, self.pre.tokenizer.eos_token_id)
            for chunk in (indices[i : i + self.rows] for i in range(0, len(indices), self.rows)):
                outputs = self._generate([requests[i].args[0] for i in chunk], cfg)
                for i, text in zip(chunk, outputs, strict=True):
                    texts[i] = cut_at_stop(text, requests[i].args[1].get("until"))
                    self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                bar.update(len(chunk))
        bar.close()
        return texts

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Requests ((context, continuation), context ids, continuation ids) -> (ELBO, is_greedy);
        a context too long for the model loses its first tokens."""
        results = []
        for pair, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            if not continuation:
                raise DifflmError(
                    f"continuation {pair[1]!r} adds no token to its context {pair[0][-40:]!r} (tokenized "
                    "together they merge): nothing to score"
                )
            keep = self.max_length - len(continuation)
            if keep < 1:
                raise DifflmError(
                    f"a continuation of {len(continuation)} tokens fills the model's {self.max_length}; it cannot be scored"
                )
            result = continuation_elbo(
                self.pre.model,
                torch.tensor(context[-keep:], device=self.device),
                torch.tensor(continuation, device=self.device),
                samples=self.settings.mc_num,
                batch_size=self.rows,
                generator=torch.Generator().manual_seed(self._seed_of(context, continuation)),
            )
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Not implemented: a masked-diffusion model has no exact likelihood to roll over windows,
        and an ELBO would be reported as a perplexity it only bounds. `difflm eval CKPT` reports the
        ELBO bound on a checkpoint's validation split."""
        raise DifflmError(
            "loglikelihood_rolling (perplexity tasks such as wikitext) is not implemented for difflm "
            "models; use `difflm eval CKPT` for the ELBO perplexity bound"
        )

    def get_model_info(self) -> dict:
        return {"pretrained": str(self.pre.path), **asdict(self.settings)}

    # ------------------------------------------------------------------ helpers

    @torch.no_grad()
    def _generate(self, contexts: list[str], cfg: SampleConfig) -> list[str]:
        """The decoded generations of one batch of prompts (right padded here; the engine left pads),
        each cut at its first EOS."""
        keep = self.max_length - cfg.gen_length
        prompts = [torch.tensor(self.tok_encode(c)[-keep:], dtype=torch.long) for c in contexts]
        pad = self.pre.tokenizer.pad_token_id or 0
        ids = pad_sequence(prompts, batch_first=True, padding_value=pad).to(self.device)  # [B, P]
        mask = pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True).to(self.device)
        generators = [
            torch.Generator(device=self.device).manual_seed(self._seed_of(p.tolist())) for p in prompts
        ]
        result = generate(
            self.pre.model, ids, cfg, attention_mask=mask, generator=generators, max_length=self.max_length
        )
        eos = self.pre.tokenizer.eos_token_id
        texts = []
        for row in result.tokens[:, ids.shape[1] :].tolist():  # [B, G]
            ended = row.index(eos) if eos in row else len(row)
            texts.append(self.pre.tokenizer.decode(row[:ended], skip_special_tokens=True))
        return texts

    def _seed_of(self, *token_lists: list[int]) -> int:
        """A seed from (settings.seed, the tokens): a request's draws do not depend on its batch."""
        digest = hashlib.sha256(repr((self.settings.seed, token_lists)).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


def cut_at_stop(text: str, until: str | list[str] | None) -> str:
    """`text` up to the earliest occurrence of any stop string (whole text when none occurs)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    return text[: min([text.find(s) for s in stops if s and s in text], default=len(text))]


def check_diffusion(pre: Pretrained) -> None:
    """The adapter samples and scores full-attention masked-diffusion models only."""
    if pre.config.task not in DIFFUSION_TASKS or getattr(pre.model, "mask_token_id", None) is None:
        raise DifflmError(
            f"{pre.path} is a {pre.config.task} model; the lm-eval adapter runs masked-diffusion models "
            f"({', '.join(DIFFUSION_TASKS)})"
        )
    if pre.config.diffusion.block_length is not None:
        raise DifflmError(
            f"{pre.path} is a block-diffusion (BD3) model; the lm-eval adapter scores full-attention "
            "masked diffusion only"
        )


def _rows_per_forward(batch_size: int | str) -> int:
    if isinstance(batch_size, str) and not batch_size.isdigit():
        raise DifflmError(
            f"batch_size must be a number of rows, got {batch_size!r} ('auto' is not supported)"
        )
    if int(batch_size) < 1:
        raise DifflmError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def register() -> None:
    """Make `difflm` a model name of lm-eval (a lazy path to `DifflmLM`; idempotent). lm-eval's own
    names are loaded first: its `get_model` loads them only into an empty registry."""
    import lm_eval.models  # noqa: F401

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"difflm.evaluate.lm_eval:{DifflmLM.__name__}")


def main() -> None:
    """lm-eval's command line with `difflm` registered (the arguments are lm-eval's)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


register()

if __name__ == "__main__":
    main()
