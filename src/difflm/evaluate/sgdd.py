"""Decode SGDD vectors into text, score reconstructions / paraphrases, and the `sample` entry.

Decoding goes through the one engine (`difflm.sampling.unmask.infill`): each row's length is
chosen first (the model's length head, or given), positions past it stay [PAD] and are attended
out, and the rest is revealed MaskGIT-style (confidence, cosine reveal schedule, 16 steps). For
guidance the conditional and unconditional rows differ only in `cond_drop`, so the engine stacks
them into one forward and combines the logits as cond + w * (cond - uncond).

Metrics compare token ids with the reference's own WordPiece ids (the best the decoder can write:
MiniLM's vocabulary is lower-cased), and BLEU / chrF on the decoded strings of both.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import Tensor

from difflm.config import system_config
from difflm.errors import DifflmError
from difflm.evaluate.metrics import bleu, chrf, exact_match, token_accuracy
from difflm.models.encoder import check_texts, warn_truncated
from difflm.pretrained import Pretrained
from difflm.sampling.unmask import SampleConfig, infill
from difflm.systems.sgdd import (
    SGDDSystemConfig,
    build_examples,
    build_task,
    load_encoder,
    split_examples,
    tokenize_targets,
)
from difflm.train.trainer import collate, step_generator


def sample_config(
    scfg: SGDDSystemConfig, length: int, cfg_scale: float, suppress: list[int], **kw
) -> SampleConfig:
    return SampleConfig(
        gen_length=length,
        steps=min(scfg.sample_steps, length),
        reveal_schedule=scfg.reveal_schedule,
        remasking=scfg.remasking,
        cfg_scale=cfg_scale,
        suppress_tokens=suppress,
        **kw,
    )


@torch.no_grad()
def decode_vectors(
    pre: Pretrained,
    vectors: Tensor,
    *,
    cfg_scale: float,
    lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 0.0,
) -> list[list[int]]:
    """Token ids of the text each vector [B, D] decodes to (length from the head unless given)."""
    if cfg_scale < 0:
        raise DifflmError(f"CFG scale must be >= 0 (0 = no guidance), got {cfg_scale}")
    model, tok = pre.model, pre.tokenizer
    device = next(model.parameters()).device
    vectors = vectors.to(device)
    lengths = (
        model.predict_length(vectors)
        if lengths is None
        else lengths.to(device).clamp(1, model.config.block_size)
    )
    width = int(lengths.max())
    fill = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [B, W]
    ids = torch.full(fill.shape, tok.pad_token_id, dtype=torch.long, device=device)
    suppress = sorted(i for i in tok.special_ids if i != tok.mask_token_id)
    scfg = system_config(pre.config, SGDDSystemConfig)
    cfg = sample_config(scfg, width, cfg_scale, suppress, temperature=temperature)
    drop = torch.zeros(len(vectors), dtype=torch.bool, device=device)
    result = infill(
        model,
        ids,
        fill,
        cfg,
        attention_mask=fill.long(),
        generator=generator,
        model_kwargs={"cond": vectors, "cond_drop": drop},
        uncond_kwargs={"cond_drop": ~drop},
    )
    return [row[:n].tolist() for row, n in zip(result.tokens, lengths.tolist(), strict=True)]


def embed_texts(encoder, texts: list[str]) -> Tensor:
    """Encoder vectors [N, D] of texts; generated texts may be blank, which still embed."""
    batch, n_long = encoder.tokenize(texts)
    warn_truncated(n_long, len(texts), encoder.config.max_length)
    return encoder.embed(batch).cpu()


def score(pre: Pretrained, encoder, source_vectors: Tensor, data, outputs: list[list[int]]) -> dict:
    """EM, token accuracy, BLEU, chrF against the targets; cosine of the output to the source
    (`source_vectors` [N, D], the encoder's unit vectors of the inputs)."""
    targets, lengths = data.ids, data.lengths
    tok = pre.tokenizer
    refs = [row[:n].tolist() for row, n in zip(targets, lengths.tolist(), strict=True)]
    aligned = [(out + [-1] * len(ref))[: len(ref)] for out, ref in zip(outputs, refs, strict=True)]
    hyp_text = [tok.decode(ids) for ids in outputs]
    ref_text = [tok.decode(ids) for ids in refs]
    cosine = torch.nn.functional.cosine_similarity(
        embed_texts(encoder, hyp_text), source_vectors, dim=-1
    )  # [N]
    return {
        "exact_match": exact_match(outputs, refs),
        "token_acc": token_accuracy(aligned, refs),
        "bleu": bleu(hyp_text, ref_text),
        "chrf": chrf(hyp_text, ref_text),
        "cosine": float(cosine.mean()),
    }


def eval_sgdd(pre: Pretrained, args: argparse.Namespace) -> dict:
    """Held-out reconstruction / paraphrase metrics with and without guidance, and the val loss.

    With `args.split == "train"` the same metrics on the first training examples instead (as many
    as there are held-out ones): a memorisation check, to tell a data-limited decoder from a
    broken one."""
    cfg, scfg = pre.config, system_config(pre.config, SGDDSystemConfig)
    split = getattr(args, "split", "val")
    pairs = split_examples(cfg, split)[: scfg.holdout]
    if args.max_batches:
        pairs = pairs[: args.max_batches * args.batch_size]
    encoder = load_encoder(cfg.model.encoder)
    data = build_examples(pairs, encoder, pre.tokenizer, cfg, scfg.encode_batch_size)
    sources = [s for s, _ in pairs]
    out = {
        "phase": scfg.phase,
        "split": split,
        "examples": len(pairs),
        "loss": diffusion_loss(pre, data, args),
    }
    out["length_acc"] = float((pre.model.predict_length(data.vectors) == data.lengths).float().mean())
    settings = [("cfg0", 0.0, False), (f"cfg{scfg.cfg_scale:g}", scfg.cfg_scale, False)]
    settings += [(f"cfg{scfg.cfg_scale:g}_oracle_len", scfg.cfg_scale, True)]
    for name, w, oracle in settings:
        outputs = []
        for start in range(0, len(pairs), args.batch_size):
            stop = start + args.batch_size
            lengths = data.lengths[start:stop] if oracle else None
            gen = torch.Generator().manual_seed(args.seed)
            outputs += decode_vectors(
                pre, data.vectors[start:stop], cfg_scale=w, lengths=lengths, generator=gen
            )
        metrics = score(pre, encoder, data.vectors, data, outputs)
        out.update({f"{name}_{k}": v for k, v in metrics.items()})
        out[f"{name}_example"] = f"{sources[0]} -> {pre.tokenizer.decode(outputs[0])}"
    return out


@torch.no_grad()
def diffusion_loss(pre: Pretrained, data, args: argparse.Namespace) -> float:
    """Mean diffusion loss (ELBO, per token) on `data`, vectors never dropped."""
    scfg = system_config(pre.config, SGDDSystemConfig)
    task = build_task(pre.config, SGDDSystemConfig(**{**vars(scfg), "uncond_prob": 0.0}), pre.tokenizer)
    losses = []
    for b, start in enumerate(range(0, len(data), args.batch_size)):
        items = [data[i] for i in range(start, min(len(data), start + args.batch_size))]
        batch = task.prepare(collate(items), step_generator(args.seed, b, salt=1))
        losses.append(task.diffusion.loss(pre.model, batch)[0].item())
    return sum(losses) / len(losses)


def sample_sgdd(pre: Pretrained, args: argparse.Namespace) -> int:
    """`difflm sample CKPT --text A [--text B]` or `--interpolate A B --alpha 0.5`."""
    scfg = system_config(pre.config, SGDDSystemConfig)
    texts = list(args.text or []) + list(args.prompt or [])
    if args.interpolate:
        texts = list(args.interpolate)
    if not texts:
        raise DifflmError("no text given: pass --text TEXT (repeatable) or --interpolate A B")
    check_texts(texts)
    encoder = load_encoder(pre.config.model.encoder)
    tokenize_targets(pre.tokenizer, texts, pre.model.config.block_size)  # warns on over-long texts
    vectors = encoder.encode(texts)  # [N, D]
    if args.interpolate:
        vectors = interpolate(vectors[0], vectors[1], args.alpha, encoder.config.normalize)[None]
        texts = [f"{texts[0]!r} <{args.alpha:g}> {texts[1]!r}"]
    w = scfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    lengths = None if args.length is None else torch.full((len(vectors),), args.length)
    gen = torch.Generator().manual_seed(args.seed)
    outputs = decode_vectors(
        pre, vectors, cfg_scale=w, lengths=lengths, generator=gen, temperature=args.temperature
    )
    for text, ids in zip(texts, outputs, strict=True):
        decoded = pre.tokenizer.decode(ids)
        print(json.dumps({"input": text, "output": decoded}) if args.json else f"{text}\n  -> {decoded}")
    return 0


def interpolate(a: Tensor, b: Tensor, alpha: float, normalize: bool) -> Tensor:
    """(1 - alpha) a + alpha b, renormalised to unit length when the encoder's vectors are."""
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise DifflmError(f"--alpha must be in [0, 1], got {alpha}")
    z = (1 - alpha) * a + alpha * b  # [D]
    return torch.nn.functional.normalize(z, dim=-1) if normalize else z
