"""`difflm data distill`: an AR model's continuations (greedy or sampled) of its own training
prompts, one training block per example."""

import dataclasses

import pytest
import torch

from difflm.cli import main
from difflm.config import load_config
from difflm.data.blocks import text_blocks
from difflm.errors import DifflmError
from difflm.pretrained import load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.distill import teacher_examples
from difflm.systems.registry import build_run
from difflm.train.trainer import train
from tests.test_trainer import tiny_overrides

P, N = 4, 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    cfg = load_config("recipes/shakespeare_char_ar.yaml", tiny_overrides(tmp, "ar", "train.max_steps=3"))
    train(cfg, build_run(cfg))
    return load_pretrained(tmp / "ar")


def test_each_example_is_a_training_prompt_and_its_greedy_continuation(teacher):
    texts = list(teacher_examples(teacher, count=5, prompt_length=P, new_tokens=N, batch=2))
    corpus = open(teacher.config.data.path, encoding="utf-8").read()
    train_part = corpus[: int(len(corpus) * (1 - teacher.config.data.val_fraction))]
    assert len(texts) == 5 and all(len(t) == P + N for t in texts)
    for text in texts:
        assert text[:P] in train_part
        prompt = torch.tensor([teacher.tokenizer.encode(text[:P])])
        alone = generate_ar(teacher.model, prompt, max_new_tokens=N, suppress_tokens=_banned(teacher))
        assert teacher.tokenizer.decode(alone.tokens[0].tolist()) == text  # batching changes nothing


def _banned(pre) -> list[int]:
    tok = pre.tokenizer
    return [tok.mask_token_id, tok.pad_token_id, tok.eos_token_id]


def test_training_blocks_of_the_written_file_are_the_examples(teacher, tmp_path, capsys):
    out = tmp_path / "greedy.txt"
    args = ["data", "distill", str(teacher.path), str(out), "--count", "20", "--prompt-length", str(P)]
    assert main([*args, "--new-tokens", str(N), "--batch", "4"]) == 0
    texts = list(teacher_examples(teacher, count=20, prompt_length=P, new_tokens=N, batch=3))
    data = dataclasses.replace(
        teacher.config.data, path=str(out), block_size=P + N, cache_dir=str(tmp_path / "c")
    )
    _, train_blocks, val_blocks = text_blocks(data, teacher.tokenizer)
    blocks = [*train_blocks, *val_blocks]
    assert [teacher.tokenizer.decode(b.tolist()) for b in blocks] == texts
    assert main([*args, "--new-tokens", str(N)]) == 2  # the file exists: nothing is overwritten
    assert "exists" in capsys.readouterr().err


def test_sampled_examples_are_the_teachers_draws_whatever_the_batch(teacher):
    def examples(batch: int, temperature: float) -> list[str]:
        return list(teacher_examples(teacher, 6, P, N, seed=3, batch=batch, temperature=temperature))

    sampled, greedy = examples(4, 1.0), examples(4, 0.0)
    assert sampled == examples(1, 1.0)
    assert [t[:P] for t in sampled] == [t[:P] for t in greedy]  # the same prompts
    assert sampled != greedy
    prompt = torch.tensor([teacher.tokenizer.encode(sampled[5][:P])])
    alone = generate_ar(
        teacher.model,
        prompt,
        max_new_tokens=N,
        temperature=1.0,
        generator=[torch.Generator().manual_seed(3 * 1_000_003 + 5)],  # example 5's own generator
        suppress_tokens=_banned(teacher),
    )
    assert teacher.tokenizer.decode(alone.tokens[0].tolist()) == sampled[5]


def test_a_negative_temperature_is_refused(teacher):
    with pytest.raises(DifflmError, match="temperature must be >= 0"):
        next(teacher_examples(teacher, count=1, prompt_length=P, new_tokens=N, temperature=-0.5))


def test_a_diffusion_teacher_is_refused(teacher):
    masked = dataclasses.replace(
        teacher,
        config=dataclasses.replace(
            teacher.config, model=dataclasses.replace(teacher.config.model, causal=False)
        ),
    )
    with pytest.raises(DifflmError, match="autoregressive"):
        next(teacher_examples(masked, count=1, prompt_length=P, new_tokens=N))
