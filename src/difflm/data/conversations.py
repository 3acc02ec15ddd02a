"""SFT data: Hugging Face conversation records -> prompt / answer ids, padded to one fixed length.

A record is `{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...],
"system": str (optional)}` (the ShareGPT layout). Choices:

- The answer is the LAST `gpt` turn, which must directly follow a `human` turn; every turn before
  it (earlier exchanges included) is the prompt. One training example per conversation. A record
  with no human -> gpt pair, an unknown role or a non-string value raises DifflmError naming the
  record (line number): a malformed SFT file is a bug to fix, not noise to skip.
- Prompt format: with a tokenizer that has a chat template, the template renders the prompt turns
  with `add_generation_prompt=True`. Otherwise the prompt is BOS (when the tokenizer has one) +
  system + each turn's ids, an earlier `gpt` turn followed by EOS as it would be generated. The
  answer is the `gpt` text followed by EOS. `difflm sample --chat` uses the same `chat_prompt_ids`.
- Examples are not packed: each is right padded to `max_length` with the pad token and an
  `attention_mask` (1 real, 0 padding), with `prompt_lengths` recorded, so batches stack and
  masked diffusion never corrupts, attends to or scores prompt and padding positions. An example
  longer than `max_length` loses the end of its answer (counted and warned about); a prompt that
  leaves no room for an answer token raises DifflmError.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflm.data.tokenizers import Tokenizer
from difflm.errors import DifflmError

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Dialogue:
    """One conversation split for SFT: the prompt turns (role, text) and the answer text."""

    system: str | None
    turns: tuple[tuple[str, str], ...]  # (from, value) before the answer, "human" / "gpt"
    answer: str


def parse_conversation(record: Any, where: str, field: str = "conversations") -> Dialogue:
    """Split one record into prompt turns and the answer (the last gpt turn after a human turn)."""
    if not isinstance(record, dict) or not isinstance(record.get(field), list):
        raise DifflmError(f"{where}: expected an object with a '{field}' list of {{from, value}} turns")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DifflmError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    turns = []
    for turn in record[field]:
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(turn.get("value"), str):
            raise DifflmError(
                f"{where}: every turn must be {{from: human|gpt|system, value: str}}, got {turn!r}"
            )
        if role == "system":
            system = turn["value"] if system is None else f"{system}\n{turn['value']}"
        else:
            turns.append((role, turn["value"]))
    last = max((i for i, (role, _) in enumerate(turns) if role == "gpt"), default=-1)
    if last < 1 or turns[last - 1][0] != "human":
        raise DifflmError(
            f"{where}: no human turn followed by a gpt turn; each SFT record needs one (the last gpt "
            "turn is the answer)"
        )
    return Dialogue(system or None, tuple(turns[:last]), turns[last][1])


def _template(tokenizer: Tokenizer) -> Any:
    """The HF tokenizer when it has a chat template, else None."""
    hf = getattr(tokenizer, "tok", None)
    return hf if getattr(hf, "chat_template", None) else None


def prompt_ids(tokenizer: Tokenizer, dialogue: Dialogue) -> list[int]:
    """Token ids of the prompt part of `dialogue` (see the module docstring for the format)."""
    hf = _template(tokenizer)
    if hf is not None:
        messages = [{"role": "system", "content": dialogue.system}] if dialogue.system else []
        messages += [{"role": ROLES[role], "content": text} for role, text in dialogue.turns]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text)
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if dialogue.system:
        ids += tokenizer.encode(dialogue.system)
    for role, text in dialogue.turns:
        ids += tokenizer.encode(text)
        if role == "gpt" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


def answer_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The answer's ids followed by EOS (when the tokenizer has one)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return tokenizer.encode(text) + eos


def chat_prompt_ids(tokenizer: Tokenizer, text: str, system: str | None = None) -> list[int]:
    """The prompt ids of a one-turn chat, formatted exactly as in SFT (for `difflm sample --chat`)."""
    return prompt_ids(tokenizer, Dialogue(system, (("human", text),), ""))


def read_conversations(path: str | Path, field: str = "conversations") -> list[Dialogue]:
    """Parse a JSONL file of conversation records (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DifflmError(f"conversation file {path} not found; give a JSONL file of conversation records")
    dialogues = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DifflmError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
            dialogues.append(parse_conversation(record, where, field))
    if not dialogues:
        raise DifflmError(f"{path} holds no conversation; check the file")
    return dialogues


def encode_dialogues(
    dialogues: list[Dialogue], tokenizer: Tokenizer, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per dialogue, the answer cut so that the pair fits `max_length`."""
    examples, cut = [], 0
    for i, dialogue in enumerate(dialogues):
        prompt, answer = prompt_ids(tokenizer, dialogue), answer_ids(tokenizer, dialogue.answer)
        if len(prompt) >= max_length:
            raise DifflmError(
                f"conversation {i}: its prompt has {len(prompt)} tokens, leaving no room for the answer "
                f"within data.block_size={max_length}; raise data.block_size or shorten the prompt"
            )
        room = max_length - len(prompt)
        cut += len(answer) > room
        examples.append((prompt, answer[:room]))
    if cut:
        warnings.warn(
            f"{cut} of {len(examples)} answers were cut to fit data.block_size={max_length}", stacklevel=2
        )
    return examples


class ConversationDataset:
    """Map-style SFT examples: input_ids [L], attention_mask [L] and prompt_lengths [] per item."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], max_length: int, pad_token_id: int):
        self.examples = examples
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        prompt, answer = self.examples[i]
        ids = torch.full((self.max_length,), self.pad_token_id, dtype=torch.long)  # [L]
        real = prompt + answer
        ids[: len(real)] = torch.tensor(real, dtype=torch.long)
        attention_mask = (torch.arange(self.max_length) < len(real)).long()  # [L]
        return {
            "input_ids": ids,
            "attention_mask": attention_mask,
            "prompt_lengths": torch.tensor(len(prompt)),
        }


def conversation_splits(
    path: str | Path, tokenizer: Tokenizer, max_length: int, val_fraction: float, field: str = "conversations"
) -> tuple[ConversationDataset, ConversationDataset]:
    """Train and val datasets: the last `val_fraction` of the records (file order) is validation."""
    examples = encode_dialogues(read_conversations(path, field), tokenizer, max_length)
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise DifflmError(
            f"{path} has {len(examples)} conversations, too few for a train/val split; add records"
        )
    pad = tokenizer.pad_token_id
    return (
        ConversationDataset(examples[:-n_val], max_length, pad),
        ConversationDataset(examples[-n_val:], max_length, pad),
    )
