"""Random weights in the layouts the pretrained checkpoints are published in, so the loading code
runs on real files without a model hub (the rehearsal, and tests of weight loading):

    timm BEiT       torch.save(state_dict) of timm's beit_base_patch16_224.in22k_ft_in22k
                    (blocks.N.attn.qkv.weight, q_bias / v_bias, relative_position_bias_table and
                    _index, gamma_1 / gamma_2, fc_norm, a 21841-class head)
    HF BEiT         a save_pretrained folder of BeitForImageClassification (microsoft/beit-base-
                    patch16-224-pt22k-ft22k, what Singularity and the released SViTT load):
                    config.json + model.safetensors
    HF BERT         a bert-base-uncased folder: vocab.txt, tokenizer_config.json, config.json and
                    model.safetensors with the names of the file on the hub (BertForPreTraining,
                    `bert.` prefix, legacy LayerNorm `gamma` / `beta`, the NSP head)

The BERT vocabulary keeps bert-base-uncased's special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
[SEP] 102, [MASK] 103) and size (30522 by default): the given words, then filler pieces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def write_timm_beit(
    path: str | Path, model_name: str = "beit_base_patch16_224.in22k_ft_in22k", seed: int = 0, **kwargs
) -> Path:
    """timm's state dict of `model_name` with random weights (pretrained=False), as a .pth file."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_hf_beit(folder: str | Path, seed: int = 0, **config) -> Path:
    """A BeitForImageClassification save_pretrained folder (config.json, model.safetensors) with
    random weights; `config` overrides BeitConfig (the default is BEiT-B/16 at 224 px, with the
    relative position bias per layer and mean pooling, as microsoft/beit-base-patch16-224-pt22k-ft22k)."""
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(seed)
    settings = dict(
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1, num_labels=21841
    )
    settings.update(config)
    model = BeitForImageClassification(BeitConfig(**settings))
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def bert_vocab(words, size: int = 30522) -> list[str]:
    """A WordPiece vocabulary of `size` entries with bert-base-uncased's special-token ids: the
    special tokens at their ids, [unused<k>] around them, the given words, then '##' filler pieces."""
    fixed = dict(BERT_SPECIAL)
    vocab = [fixed.get(i, f"[unused{i - 1 if i < 100 else i - 5}]") for i in range(999)]
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    for piece in chars + [f"##{c}" for c in chars] + sorted(set(words)):
        if piece not in vocab:
            vocab.append(piece)
    filler = 0
    while len(vocab) < size:
        vocab.append(f"##{filler:05d}")
        filler += 1
    if len(vocab) > size:
        raise ValueError(f"{len(vocab)} vocabulary entries do not fit a vocabulary of {size}")
    return vocab


def basic_words(texts) -> list[str]:
    """Lower-cased words and punctuation marks of `texts`, as BERT's basic tokenizer splits them."""
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    return sorted(words)


def write_bert_folder(folder: str | Path, texts=(), seed: int = 0, weights: bool = True, **config) -> Path:
    """A bert-base-uncased style folder: tokenizer files, and (weights=True) config.json and
    model.safetensors in the hub file's naming with random values. `config` overrides BertConfig
    (default: BERT-base)."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForPreTraining

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = config.get("vocab_size", 30522)
    (folder / "vocab.txt").write_text("\n".join(bert_vocab(basic_words(texts), vocab_size)) + "\n", encoding="utf-8")
    tokenizer = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")
    if not weights:
        return folder
    torch.manual_seed(seed)
    cfg = BertConfig(**config)
    model = BertForPreTraining(cfg)
    state = {
        _legacy_name(k): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(cfg.to_json_string(), encoding="utf-8")
    return folder


def _legacy_name(key: str) -> str:
    """bert-base-uncased's published names: LayerNorm.weight / .bias are LayerNorm.gamma / .beta."""
    return re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key))
