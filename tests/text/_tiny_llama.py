"""A tiny random-weight llama model in GGUF, written with the ``gguf`` package (no download): 64 wide,
2 layers, a ~400-token SentencePiece-style vocabulary with byte fallback tokens and a chat template.
It talks nonsense, which is all the guard's tests need from it: real tokens, log-probabilities, logit bias,
embeddings and streaming from llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_WORD_TEXT = ("the a an and or but if then else is are was were be been have has had do does did not no yes "
          "i you he she it we they me him her us them my your his its our their this that these those "
          "what which who when where why how all any both each few more most other some such only own same "
          "so than too very can will just should now model guard token secret answer question hello world "
          "good bad new old big small first last long great little right high different large next early "
          "young important public private real best free able data text word time year people way day man "
          "thing woman life child school state family student group country problem hand part place case "
          "week company system program work government number night point home water room mother area money "
          "story fact month lot study book eye job business issue side kind head house service friend father "
          "power hour game line end member law car city community name president team minute idea kid body "
          "information back parent face others level office door health person art war history party result "
          "change morning reason research girl guy moment air teacher force education")
_WORDS = _WORD_TEXT.split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write the model to ``path`` and return it (about half a megabyte, well under a second)."""
    import gguf

    rng = np.random.default_rng(seed)
    n_embd, n_layer, n_head, n_ff, n_ctx = 64, 2, 4, 128, 512
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581" + w for w in dict.fromkeys(_WORDS)] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[-1])).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, n_embd) * 8)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
