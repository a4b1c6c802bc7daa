"""Write GGUF files with gguf-py: a LoRA adapter (as llama.cpp's convert_lora_to_gguf.py lays it out) or a model.

Tensors are encoded like llama.cpp's converters: 1-D tensors (norms, biases) stay F32, matrices take
the output type; a matrix whose rows do not split into Q8_0 blocks of 32 falls back to F16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .._exceptions import ConfigError
from . import arch as _arch

OUTTYPES = ("f16", "bf16", "q8_0")


def _qtypes():
    import gguf

    return {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
            "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


def add_tensor(writer: Any, name: str, tensor: Any, outtype: str) -> str:
    """Encode ``tensor`` (torch) for ``outtype`` and add it; return the GGML type name written."""
    import gguf
    import numpy as np

    data = tensor.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 else _qtypes()[outtype][0]
    try:
        encoded = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows not a multiple of the block size (e.g. a rank-8 LoRA B)
        qtype = gguf.GGMLQuantizationType.F16
        encoded = gguf.quants.quantize(data, qtype)
    raw = qtype if encoded.dtype == np.uint8 else None
    writer.add_tensor(name, encoded, raw_dtype=raw)
    return qtype.name


def _open(out: Path, arch: _arch.Arch, name: str, outtype: str, kind: str):
    import gguf

    writer = gguf.GGUFWriter(str(out), arch.gguf_name)
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(_qtypes()[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def _close(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_adapter(out: Path, *, arch: _arch.Arch, name: str, alpha: float, rank: int,
                  tensors: Iterable[tuple[str, Any]], outtype: str) -> dict[str, str]:
    """A LoRA adapter GGUF: general.type=adapter, adapter.type=lora, adapter.lora.alpha; ``*.lora_a/.lora_b``."""
    import gguf

    writer = _open(out, arch, name, outtype, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_uint32("tunekit.lora.rank", rank)  # informational: llama.cpp reads the rank from lora_a
    types = {n: add_tensor(writer, n, t, outtype) for n, t in tensors}
    _close(writer)
    return types


def write_model(out: Path, model_dir: Path, *, arch: _arch.Arch, config: dict[str, Any], name: str,
                tensors: Iterable[tuple[str, Any]], outtype: str) -> dict[str, str]:
    """A whole-model GGUF: hyperparameters, tokenizer (vocab, merges, special ids, chat template), tensors."""
    import gguf

    writer = _open(out, arch, name, outtype, gguf.GGUFType.MODEL)
    n_head, n_kv = _arch.head_counts(config)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_arch.rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_name == "llama":  # what llama.cpp's Llama converter adds
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    _add_vocab(writer, model_dir, arch, int(config["vocab_size"]))
    types = {n: add_tensor(writer, n, t, outtype) for n, t in tensors}
    if _arch.check_rope(config) == "llama3":
        import torch

        name_rf = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        types[name_rf] = add_tensor(writer, name_rf, torch.tensor(_arch.llama3_rope_factors(config, head_dim)),
                                    outtype)
    _close(writer)
    return types


def _add_vocab(writer: Any, model_dir: Path, arch: _arch.Arch, n_vocab: int) -> None:
    """Tokens from tokenizer.json (byte-level BPE, or SentencePiece-style BPE), padded to the model's vocab."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    vocab: Any = None
    for kind in (BpeVocab, LlamaHfVocab):
        try:
            vocab = kind(model_dir)
            break
        except (FileNotFoundError, TypeError, ValueError, ImportError):
            continue
    if vocab is None:
        raise ConfigError(f"{model_dir}: no tokenizer.json with a BPE tokenizer that gguf-py can read",
                          field="tokenizer",
                          hint="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8", errors="replace"))
        scores.append(score)
        types.append(ttype)
    # tokens the tokenizer marks special are CONTROL (not rendered as text), like llama.cpp's converter
    tok_json = model_dir / "tokenizer.json"
    added = json.loads(tok_json.read_text(encoding="utf-8")).get("added_tokens") or [] if tok_json.is_file() else []
    for tok in added:
        if tok["id"] < len(types):
            types[tok["id"]] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise ConfigError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the model's embeddings only "
                          f"{n_vocab} (tokens were added while training)", field="tokenizer",
                          hint="export the merged model instead: add --merge (the merge resizes the embeddings)")
    for i in range(len(tokens), n_vocab):  # the embedding matrix may be larger than the tokenizer
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(arch.bpe_pre)
    writer.add_token_list(tokens)
    if vocab.tokenizer_model != "gpt2":  # byte-level BPE has no scores (llama.cpp's converter writes none)
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True)
