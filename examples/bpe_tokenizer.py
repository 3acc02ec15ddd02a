"""A 4096-token byte-level BPE tokenizer for the Qwen3 examples, trained on WikiText-2 (test split)
and the PAWS pairs, with the specials difflm needs (BOS, EOS, PAD, MASK); saved as an HF tokenizer
folder OUT/tokenizer (kept when it exists).

    python examples/bpe_tokenizer.py OUT DATA_DIR    # DATA_DIR holds wikitext2_test.txt, paws_pairs.jsonl
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"]


def corpus_lines(data: Path) -> list[str]:
    texts = [line for line in (data / "wikitext2_test.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in (data / "paws_pairs.jsonl").read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        texts += [pair["source"], pair["target"]]
    return texts


def main(out: Path, data: Path) -> None:
    folder = out / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus_lines(data), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", mask_token="<|mask|>"
    )
    tok.save_pretrained(folder)
    print(f"tokenizer: {len(tok)} tokens -> {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
