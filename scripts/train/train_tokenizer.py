#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of the flashmoe tiny trained model and pre-tokenize the corpus.

Reads the corpus written by scripts/corpus/build_corpus.py (documents separated by a line holding
only <|endoftext|>), trains a byte-level BPE (Python `tokenizers`, NFC normalizer, Qwen-style
pre-tokenizer regex via ByteLevel(use_regex=True)) with 8192 ids in total: 8183 regular tokens, then
the special tokens <|endoftext|>, <|im_start|>, <|im_end|> and the added (non-special) tokens
<think>, </think>, <tool_call>, </tool_call>, <tool_response>, </tool_response>.

Writes to --tok-out: tokenizer.json, tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>) and
chat_template.jinja (ChatML). Writes to --data-out: train.bin / heldout.bin (uint16 token ids, each
document followed by <|endoftext|>) and meta.json.

    python3 scripts/train/train_tokenizer.py --corpus .carry/corpus --tok-out .carry/tokenizer \
        --data-out .carry/data
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import make_model_fixtures as mfx  # noqa: E402

VOCAB_TOTAL = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
DOC_SEP = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_docs(path):
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    docs = [d.strip("\n") for d in text.split("\n" + DOC_SEP + "\n")]
    return [d for d in docs if d]


def train_tokenizer(docs):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n_regular = VOCAB_TOTAL - len(SPECIAL_TOKENS) - len(ADDED_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert tok.get_vocab_size(with_added_tokens=True) == n_regular, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                               special=False) for t in ADDED_TOKENS])
    spec = json.loads(tok.to_str())
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                       "use_regex": False}
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_TOTAL
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    added_dec = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": t in SPECIAL_TOKENS}
                 for t in SPECIAL_TOKENS + ADDED_TOKENS}
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_dec,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return tok, tok_config, ids


def encode_docs(tok, docs, eot):
    out = []
    B = 512
    for i in range(0, len(docs), B):
        for e in tok.encode_batch(docs[i:i + B], add_special_tokens=False):
            out.extend(e.ids)
            out.append(eot)
    a = np.asarray(out, dtype=np.uint16)
    assert int(a.max()) < VOCAB_TOTAL
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".carry/corpus")
    ap.add_argument("--tok-out", default=".carry/tokenizer")
    ap.add_argument("--data-out", default=".carry/data")
    args = ap.parse_args()
    t0 = time.time()
    train_docs = read_docs(os.path.join(args.corpus, "train.txt"))
    held_docs = read_docs(os.path.join(args.corpus, "heldout.txt"))
    print(f"{len(train_docs)} train docs, {len(held_docs)} held-out docs", flush=True)
    tok, tok_config, ids = train_tokenizer(train_docs)
    print(f"tokenizer trained in {time.time() - t0:.1f}s; special ids {ids}", flush=True)
    os.makedirs(args.tok_out, exist_ok=True)
    mfx.save_tokenizer(tok, tok_config, args.tok_out)
    with open(os.path.join(args.tok_out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE + "\n")

    os.makedirs(args.data_out, exist_ok=True)
    meta = {"vocab_size": VOCAB_TOTAL, "eot_id": ids["<|endoftext|>"], "dtype": "uint16", "special_ids": ids}
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        a = encode_docs(tok, docs, ids["<|endoftext|>"])
        a.tofile(os.path.join(args.data_out, f"{name}.bin"))
        nbytes = sum(len(d.encode()) for d in docs)
        meta[name] = {"tokens": int(a.size), "docs": len(docs), "bytes": nbytes,
                      "bytes_per_token": nbytes / a.size}
        print(f"{name}: {a.size} tokens, {nbytes / a.size:.2f} bytes/token", flush=True)
    mfx.write_json(os.path.join(args.data_out, "meta.json"), meta, indent=2)
    for s in ["The history of the world", "Hello world", "def main():\n    return 0"]:
        e = tok.encode(s)
        print(repr(s), "->", e.tokens, flush=True)
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
