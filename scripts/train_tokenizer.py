"""Trains the tiny models' tokenizer: byte-level BPE on the GENERAL training corpus only.

  python scripts/train_tokenizer.py [--vocab=4096] [--out=assets/tokenizer]
  python scripts/train_tokenizer.py --corpus=data/corpus/train.jsonl.gz --vocab=8192 \
      --out=assets/tokenizer_v2

4096 tokens: large enough that English and Python average ~3.5 characters per token, small
enough that the embedding and output matrices stay a small share of a tiny model. Byte-level,
so any text (the Chinese law/intent domains included, which it never saw) still encodes,
at ~3 tokens per CJK character. Deterministic for a given corpus. The chat template mirrors
DeepSeek-V2's ("User: ...\\n\\nAssistant: ...<eos>").

`:tiny_v2`'s tokenizer (8192 tokens) is trained on the multilingual corpus of
scripts/make_corpus.py (documents in a .jsonl.gz), so Chinese encodes at about one token per
character instead of three (the script prints both rates).
"""

import argparse
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", default=os.path.join(REPO, "data", "general", "train.txt"))
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--out", default=os.path.join(REPO, "assets", "tokenizer"))
  args = parser.parse_args()

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=list(SPECIAL.values()),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                min_frequency=2, show_progress=False)
  if args.corpus.endswith(".jsonl.gz"):   # documents of scripts/make_corpus.py
    import make_corpus  # noqa: E402  (scripts/ is on sys.path when this script runs)
    texts = [d["text"] for d in make_corpus.read_docs(args.corpus)]
    tok.train_from_iterator(texts, trainer)
  else:
    tok.train([args.corpus], trainer)
    texts = [open(args.corpus).read()]
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE,
                                 model_max_length=4096, **SPECIAL)
  fast.save_pretrained(args.out)
  text = "\n".join(texts)[:200_000]
  n = len(fast(text)["input_ids"])
  print(f"saved {args.out}: vocab {fast.vocab_size}, {len(text) / n:.2f} characters per token on "
        f"the corpus head")
  law = os.path.join(REPO, "data", "law", "train.jsonl")
  zh = "".join(m["content"] for line in open(law, encoding="utf-8")
               for m in json.loads(line)["messages"])[:50_000]
  print(f"law (Chinese): {len(fast(zh)['input_ids']) / len(zh):.2f} tokens per character")


if __name__ == "__main__":
  main()
