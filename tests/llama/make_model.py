#!/usr/bin/env python3
"""Writes a tiny llama-architecture model with seeded random weights as GGUF, for llama-server.

Two layers, 64 wide, four heads, a SentencePiece-style ("llama") vocabulary of <unk>, <s>, </s>,
the 256 byte tokens <0x00>..<0xFF> and the word boundary U+2581, so every prompt tokenizes by
byte fallback: after <s>, one token for the space llama.cpp puts before the text, then one per
space and one per byte of everything else (an ASCII prompt of N characters is N + 2 tokens). The weights are random
but seeded, so the same gguf package writes the same file, and what it says is nonsense but
repeatable. Usage: make_model.py OUT.gguf
"""

import sys

import numpy as np

import gguf

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 2048
SEED = 20240601


def vocabulary():
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    # The SentencePiece word boundary, so that a space is one token rather than its three bytes.
    tokens.append("\u2581".encode())
    types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * len(tokens)
    return tokens, scores, types


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_model.py OUT.gguf")
    out = sys.argv[1]
    rng = np.random.default_rng(SEED)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(out, "llama")
    w.add_name("tally-test-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def tensor(name, *shape, scale=0.02):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    n_kv = N_EMBD // N_HEAD * N_HEAD_KV
    tensor("token_embd.weight", n_vocab, N_EMBD, scale=1.0)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", N_EMBD)
        tensor(p + "attn_q.weight", N_EMBD, N_EMBD)
        tensor(p + "attn_k.weight", n_kv, N_EMBD)
        tensor(p + "attn_v.weight", n_kv, N_EMBD)
        tensor(p + "attn_output.weight", N_EMBD, N_EMBD)
        ones(p + "ffn_norm.weight", N_EMBD)
        tensor(p + "ffn_gate.weight", N_FF, N_EMBD)
        tensor(p + "ffn_up.weight", N_FF, N_EMBD)
        tensor(p + "ffn_down.weight", N_EMBD, N_FF)
    ones("output_norm.weight", N_EMBD)
    tensor("output.weight", n_vocab, N_EMBD, scale=1.0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
