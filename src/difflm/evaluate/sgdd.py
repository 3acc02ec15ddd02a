"""Score SGDD reconstructions / paraphrases (`difflm eval`) and the `difflm sample` entry.

Plain decoding lives in `difflm.evaluate.sgdd_decode`, verification (best-of-N, correction rounds,
edit search) in `difflm.evaluate.sgdd_verify`. Metrics compare token ids with the reference's own WordPiece ids (the best the decoder can write:
MiniLM's vocabulary is lower-cased), and BLEU / chrF on the decoded strings of both.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch import Tensor

from difflm.config import system_config
from difflm.errors import DifflmError
from difflm.evaluate.metrics import bleu, chrf, exact_match, token_accuracy
from difflm.evaluate.options import EvalOptions
from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.evaluate.sgdd_verify import Verification, verified_decode
from difflm.models.encoder import check_texts, warn_truncated
from difflm.pretrained import Pretrained
from difflm.sampling.settings import SampleOptions
from difflm.systems.sgdd import (
    SGDDSystemConfig,
    build_examples,
    build_objective,
    load_encoder,
    read_file_examples,
    split_examples,
    tokenize_targets,
)
from difflm.train.trainer import collate, step_generator


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


def eval_sgdd(pre: Pretrained, opts: EvalOptions) -> dict:
    """Reconstruction / paraphrase metrics with and without guidance (and with verification when
    `opts.best_of` > 1, `opts.rounds` or `opts.search` > 0), the val loss, and the decoding time per sentence.

    The examples are the held-out split, or with `opts.split == "train"` as many training ones (a
    memorisation check), or with `opts.data` every example of that file (see `read_file_examples`)."""
    cfg, scfg = pre.config, system_config(pre.config, SGDDSystemConfig)
    split = "file" if opts.data else opts.split
    pairs = read_file_examples(opts.data) if opts.data else split_examples(cfg, split)[: scfg.holdout]
    if opts.max_batches:
        pairs = pairs[: opts.max_batches * opts.batch_size]
    encoder = load_encoder(cfg.model.encoder)
    data = build_examples(pairs, encoder, pre.tokenizer, cfg, scfg.encode_batch_size)
    out = {
        "phase": scfg.phase,
        "split": split,
        "data": opts.data,
        "examples": len(pairs),
        "loss": diffusion_loss(pre, data, opts),
        "length_acc": float((pre.model.predict_length(data.vectors) == data.lengths).float().mean()),
    }
    if any(source != target for source, target in pairs):  # paraphrases: the copy-the-input baseline
        ids, lengths = tokenize_targets(pre.tokenizer, [s for s, _ in pairs], cfg.model.block_size)
        copies = [row[:n].tolist() for row, n in zip(ids, lengths.tolist(), strict=True)]
        out.update({f"copy_{k}": v for k, v in score(pre, encoder, data.vectors, data, copies).items()})
    w = scfg.cfg_scale if opts.cfg_scale is None else opts.cfg_scale
    settings = [("cfg0", 0.0, False, None)] + ([(f"cfg{w:g}", w, False, None)] if w else [])
    settings.append((f"cfg{w:g}_oracle_len", w, True, None))
    verify = verification_of(opts)
    if verify.candidates > 1 or verify.rounds > 0 or verify.search > 0:
        name = f"cfg{w:g}_n{verify.candidates}_r{verify.rounds}" + (f"_s{verify.search}" if verify.search else "")
        name += f"_f{verify.fluency:g}" if verify.search and verify.fluency else ""
        settings.append((name, w, False, verify))
    for name, scale, oracle, verification in settings:
        start = time.perf_counter()
        outputs = decode_all(pre, encoder, data, scale, oracle, verification, opts)
        seconds = time.perf_counter() - start
        metrics = score(pre, encoder, data.vectors, data, outputs)
        out.update({f"{name}_{k}": v for k, v in metrics.items()})
        out[f"{name}_ms_per_sentence"] = 1000 * seconds / len(pairs)
        out[f"{name}_examples"] = [
            {"source": s, "output": pre.tokenizer.decode(ids)}
            for (s, _), ids in zip(pairs[:3], outputs[:3], strict=True)
        ]
    return out


def verification_of(opts: EvalOptions | SampleOptions) -> Verification:
    """The verification the --best-of, --rounds, --search, --search-patience and --fluency flags ask for."""
    patience = {} if opts.search_patience is None else {"patience": opts.search_patience}
    return Verification(
        candidates=opts.best_of or 1, rounds=opts.rounds, search=opts.search, fluency=opts.fluency, **patience
    )


def decode_all(
    pre: Pretrained, encoder, data, cfg_scale: float, oracle: bool, verification, opts: EvalOptions
) -> list[list[int]]:
    """Every example's output ids, `opts.batch_size` vectors at a time, seeded per batch."""
    outputs = []
    for start in range(0, len(data), opts.batch_size):
        stop = start + opts.batch_size
        lengths = data.lengths[start:stop] if oracle else None
        gen = torch.Generator().manual_seed(opts.seed)
        vectors = data.vectors[start:stop]
        if verification is None:
            outputs += decode_vectors(pre, vectors, cfg_scale=cfg_scale, lengths=lengths, generator=gen)
        else:
            found = verified_decode(pre, encoder, vectors, verification, cfg_scale=cfg_scale, generator=gen)
            outputs += found.as_lists()
    return outputs


@torch.no_grad()
def diffusion_loss(pre: Pretrained, data, opts: EvalOptions) -> float:
    """Mean diffusion loss (ELBO, per token) on `data`, vectors never dropped."""
    scfg = system_config(pre.config, SGDDSystemConfig)
    objective = build_objective(pre.config, SGDDSystemConfig(**{**vars(scfg), "uncond_prob": 0.0}), pre.tokenizer)
    losses = []
    for b, start in enumerate(range(0, len(data), opts.batch_size)):
        items = [data[i] for i in range(start, min(len(data), start + opts.batch_size))]
        batch = objective.prepare(collate(items), step_generator(opts.seed, b, salt=1))
        losses.append(objective.diffusion.loss(pre.model, batch)[0].item())
    return sum(losses) / len(losses)


def sample_sgdd(pre: Pretrained, opts: SampleOptions) -> int:
    """`difflm sample CKPT --text A [--text B]` or `--interpolate A B --alpha 0.5`."""
    scfg = system_config(pre.config, SGDDSystemConfig)
    texts = list(opts.text or []) + list(opts.prompt or [])
    if opts.interpolate:
        texts = list(opts.interpolate)
    if not texts:
        raise DifflmError("no text given: pass --text TEXT (repeatable) or --interpolate A B")
    check_texts(texts)
    encoder = load_encoder(pre.config.model.encoder)
    tokenize_targets(pre.tokenizer, texts, pre.model.max_length)  # warns on over-long texts
    vectors = encoder.encode(texts)  # [N, D]
    if opts.interpolate:
        vectors = interpolate(vectors[0], vectors[1], opts.alpha, encoder.config.normalize)[None]
        texts = [f"{texts[0]!r} <{opts.alpha:g}> {texts[1]!r}"]
    w = scfg.cfg_scale if opts.cfg_scale is None else opts.cfg_scale
    lengths = None if opts.length is None else torch.full((len(vectors),), opts.length)
    gen = torch.Generator().manual_seed(opts.seed)
    verify = verification_of(opts)
    if verify.candidates > 1 or verify.rounds or verify.search:
        outputs = verified_decode(
            pre, encoder, vectors, verify, cfg_scale=w, generator=gen, lengths=lengths
        ).as_lists()
    else:
        outputs = decode_vectors(
            pre, vectors, cfg_scale=w, lengths=lengths, generator=gen, temperature=opts.temperature
        )
    for text, ids in zip(texts, outputs, strict=True):
        decoded = pre.tokenizer.decode(ids)
        print(json.dumps({"input": text, "output": decoded}) if opts.json else f"{text}\n  -> {decoded}")
    return 0


def interpolate(a: Tensor, b: Tensor, alpha: float, normalize: bool) -> Tensor:
    """(1 - alpha) a + alpha b, renormalised to unit length when the encoder's vectors are."""
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise DifflmError(f"--alpha must be in [0, 1], got {alpha}")
    z = (1 - alpha) * a + alpha * b  # [D]
    return torch.nn.functional.normalize(z, dim=-1) if normalize else z
