"""Qwen3-LLaDA systems: loss wiring (hand-computed), SFT data and masking, block-attention sampling."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from difflm.commands import sample as sample_command
from difflm.commands.flags import options_from
from difflm.config import load_config
from difflm.data.conversations import (
    ConversationDataset,
    chat_prompt_ids,
    encode_dialogues,
    parse_conversation,
    prompt_ids,
    read_conversations,
)
from difflm.data.tokenizers import HFTokenizer
from difflm.errors import DifflmError
from difflm.models.block_attention import block_attention_bias
from difflm.models.layers import padding_bias
from difflm.pretrained import Pretrained
from difflm.sampling.settings import SampleOptions
from difflm.systems.qwen3_llada import sample
from difflm.systems.registry import build_run
from difflm.train.trainer import collate
from tests.qwen3_llada_fixtures import pretrain_overrides, save_tokenizer, sft_overrides

BOS, EOS, PAD, MASK = 1, 2, 3, 4


def w(k: int) -> int:
    """Id of word wK in the fixture tokenizer."""
    return 5 + k


@pytest.fixture
def tokenizer(tmp_path) -> HFTokenizer:
    return HFTokenizer.from_pretrained(str(save_tokenizer(tmp_path / "tok")))


def prepared_batch(run, seed: int = 0, n: int = 4):
    batch = collate([run.train_data[i] for i in range(n)])
    return batch, run.objective.prepare(batch, torch.Generator().manual_seed(seed))


def hand_loss(name: str, logits, batch, prepared) -> torch.Tensor:
    """The recipe's losses written out position by position."""
    x, noisy, noised, p = batch["input_ids"], prepared["noisy"], prepared["noised"], prepared["inv_weight"]
    B, L = x.shape
    logp = F.log_softmax(logits.double(), dim=-1)  # [B, L, V]
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        answer = int(prepared["loss_mask"][b].sum()) if name == "sft" else None
        for i in range(L):
            chosen = noisy[b, i] == MASK if name == "dllm" else noised[b, i]
            if name == "sft":
                chosen = chosen and prepared["loss_mask"][b, i]
            if not chosen:
                continue
            ce = -logp[b, i, x[b, i]]
            if name == "soft_ce":
                ce = 0.9 * ce + 0.1 * -logp[b, i].mean()
            total += ce / p[b] / (answer * B if name == "sft" else B * L)
    return total


@pytest.mark.parametrize("name", ["elbo", "dllm", "soft_ce", "sft"])
def test_task_wires_the_chosen_loss(tmp_path, name):
    extra = ["system.block_attention=true", "system.block_length=2", f"diffusion.loss={name}"]
    overrides = sft_overrides if name == "sft" else pretrain_overrides
    run = build_run(load_config(None, overrides(tmp_path, "out", *extra)))
    batch, prepared = prepared_batch(run)
    bias = block_attention_bias(
        batch.get("prompt_lengths", torch.zeros(4, dtype=torch.long)),
        batch["input_ids"].shape[1],
        2,
        see_earlier_blocks=True,
        attention_mask=batch.get("attention_mask"),
        check_fit=False,
    )
    assert torch.equal(prepared["attention_bias"], bias)  # the training block bias
    if "attention_mask" in batch:
        bias = bias + padding_bias(batch["attention_mask"])
    with torch.no_grad():
        loss, _ = run.objective.loss(run.model.eval(), prepared)
        logits = run.model(prepared["noisy"], attention_bias=bias)
    torch.testing.assert_close(loss.double(), hand_loss(name, logits, batch, prepared), rtol=1e-5, atol=1e-6)


def test_unknown_loss_and_sft_loss_in_pretraining_are_rejected(tmp_path):
    with pytest.raises(DifflmError, match="diffusion.loss"):
        load_config(None, pretrain_overrides(tmp_path, "out", "diffusion.loss=mse"))
    with pytest.raises(DifflmError, match="sft needs prompts"):
        build_run(load_config(None, pretrain_overrides(tmp_path, "out", "diffusion.loss=sft")))


def test_sft_batch_never_masks_prompt_or_padding(tmp_path):
    run = build_run(load_config(None, sft_overrides(tmp_path, "out", "diffusion.min_rate=0.9")))
    batch = collate([run.train_data[i] for i in range(len(run.train_data))])
    positions = torch.arange(batch["input_ids"].shape[1])
    answer = (positions[None] >= batch["prompt_lengths"][:, None]) & batch["attention_mask"].bool()
    assert (batch["attention_mask"] == 0).any() and (batch["prompt_lengths"] >= 3).all()
    for seed in range(20):
        prepared = run.objective.prepare(batch, torch.Generator().manual_seed(seed))
        assert not (prepared["noised"] & ~answer).any()
        assert torch.equal(prepared["noisy"][~answer], batch["input_ids"][~answer])
        assert torch.equal(prepared["loss_mask"], answer)  # the sft loss divides by this count
        assert prepared["noised"].any()


def test_conversation_mapping_is_exact(tmp_path, tokenizer):
    record = {
        "system": "w0",
        "conversations": [
            {"from": "human", "value": "w1 w2"},
            {"from": "gpt", "value": "w3"},
            {"from": "human", "value": "w4"},
            {"from": "gpt", "value": "w5 w6"},
        ],
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    examples = encode_dialogues(read_conversations(path), tokenizer, max_length=12)
    prompt = [BOS, w(0), w(1), w(2), w(3), EOS, w(4)]
    assert examples == [(prompt, [w(5), w(6), EOS])]
    item = ConversationDataset(examples, 12, PAD)[0]
    assert item["input_ids"].tolist() == [*prompt, w(5), w(6), EOS, PAD, PAD]
    assert item["attention_mask"].tolist() == [1] * 10 + [0] * 2
    assert int(item["prompt_lengths"]) == 7
    assert chat_prompt_ids(tokenizer, "w4", system="w0") == [BOS, w(0), w(4)]
    with pytest.warns(UserWarning, match="1 of 1 answers were cut"):
        assert encode_dialogues(read_conversations(path), tokenizer, 8) == [(prompt, [w(5)])]
    with pytest.raises(DifflmError, match="no room for the answer"):
        encode_dialogues(read_conversations(path), tokenizer, 7)


def test_chat_template_formats_prompts_when_present(tokenizer):
    tokenizer.tok.chat_template = "{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w39{% endif %}"
    dialogue = parse_conversation(
        {"system": "w0", "conversations": [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]},
        "x",
    )
    assert prompt_ids(tokenizer, dialogue) == [BOS, w(0), BOS, w(1), w(39)]
    assert chat_prompt_ids(tokenizer, "w1", system="w0") == [BOS, w(0), BOS, w(1), w(39)]


@pytest.mark.parametrize(
    "turns",
    [
        [{"from": "gpt", "value": "w1"}],
        [{"from": "human", "value": "w1"}],
        [{"from": "gpt", "value": "w1"}, {"from": "human", "value": "w2"}],
        [{"from": "system", "value": "w0"}, {"from": "gpt", "value": "w1"}],
    ],
)
def test_conversation_without_human_gpt_pair_is_an_error(tmp_path, turns):
    path = tmp_path / "chat.jsonl"
    good = {"conversations": [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(DifflmError, match=r"chat.jsonl:2: no human turn followed by a gpt turn"):
        read_conversations(path)


def test_bad_turns_are_errors_naming_the_record():
    with pytest.raises(DifflmError, match="rec 5: every turn"):
        parse_conversation({"conversations": [{"from": "bot", "value": "hi"}]}, "rec 5")
    with pytest.raises(DifflmError, match="rec 6: expected an object"):
        parse_conversation({"messages": []}, "rec 6")


def sample_args(*argv: str) -> SampleOptions:
    parser = argparse.ArgumentParser()
    sample_command.add_arguments(parser)
    return options_from(SampleOptions, parser.parse_args(["unused", "--prompt", "unused", *argv]))


def test_block_attention_sampling_keeps_prompt_and_first_block(tmp_path):
    cfg = load_config(None, pretrain_overrides(tmp_path, "out", "system.block_length=4"))
    run = build_run(cfg)
    pre = Pretrained(run.model.eval(), run.tokenizer, cfg, tmp_path)
    prompts = ["w1 w2 w3", "w4"]
    ids, mask = sample_command.encode_batch(run.tokenizer, prompts)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    outs = {}
    for gen in (8, 12):
        steps = str(gen // 4)  # one step per block: a whole block per forward
        args = sample_args(
            "--gen-length", str(gen), "--steps", steps, "--block-length", "4", "--block-attention"
        )
        outs[gen] = sample(pre, args, ids, mask, torch.Generator().manual_seed(0)).tokens
        assert outs[gen].shape == (2, 3 + gen)
        assert torch.equal(outs[gen][:, :3][mask.bool()], ids[mask.bool()])  # the prompt never changes
        assert not (outs[gen] == MASK).any()
    # block 0 sees only the prompt and itself, so later blocks cannot change it
    assert torch.equal(outs[8][:, :7], outs[12][:, :7])
    args = sample_args(
        "--gen-length", "8", "--steps", "4", "--block-length", "4", "--block-attention", "--remasking", "random_topk",
        "--cfg-scale", "1.5", "--temperature", "1.0",
    )  # fmt: skip
    out = sample(pre, args, ids, mask, torch.Generator().manual_seed(1))
    assert out.tokens.shape == (2, 11) and torch.equal(out.tokens[:, :3][mask.bool()], ids[mask.bool()])
    with pytest.raises(DifflmError, match="block length 8 larger than the generation length 4"):
        sample(
            pre, sample_args("--gen-length", "4", "--block-length", "8", "--block-attention"), ids, mask, None
        )
    with pytest.raises(DifflmError, match="needs --block-length"):
        sample(pre, sample_args("--gen-length", "4", "--block-attention"), ids, mask, None)


def test_block_attention_makes_the_kv_caches_exact(tmp_path):
    """Under block attention no block sees a later one, so prefix and dual caches change nothing."""
    cfg = load_config(None, pretrain_overrides(tmp_path, "out", "system.block_length=4"))
    run = build_run(cfg)
    pre = Pretrained(run.model.eval(), run.tokenizer, cfg, tmp_path)
    ids, mask = sample_command.encode_batch(run.tokenizer, ["w1 w2 w3", "w4"])
    common = ("--gen-length", "12", "--steps", "12", "--block-length", "4", "--block-attention")
    plain = sample(pre, sample_args(*common), ids, mask, None)
    for mode in ("prefix", "dual"):
        cached = sample(pre, sample_args(*common, "--cache", mode), ids, mask, None)
        assert torch.equal(cached.tokens, plain.tokens) and cached.forward_passes == 12, mode


def test_chat_prompts_are_encoded_as_in_sft(tokenizer):
    ids, mask = sample_command.encode_batch(tokenizer, ["w1 w2", "w3"], chat=True)
    assert ids.tolist() == [[BOS, w(1), w(2)], [PAD, BOS, w(3)]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
