"""Checkpoints saved by the released SViTT training code (github JerryYLi/svitt) -> this project.

The released scripts (tasks/pretrain.py, retrieval.py, vqa.py) save
`{"model": state_dict, "config": OmegaConf DictConfig, "optimizer", "scheduler", "scaler", "epoch",
"global_step"}`. Three kinds of model are supported:

    pretrain   models/model_pretrain.py: BEiT `vision_encoder`, `vision_layernorm`, BertForMaskedLM
               `text_encoder.bert.*` + `text_encoder.cls.*`, `vision_proj`, `text_proj`, `temp`, `itm_head`
    retrieval  models/model_retrieval.py: as pretrain with a BertModel `text_encoder.*` (no MLM head)
    qa         models/model_vqa.py: `vision_encoder` without its pooler, `vision_layernorm`, BertModel
               `text_encoder.*`, a BertLMHeadModel `text_decoder.*` (3 layers with cross-attention)

Reading: torch.load(weights_only=True) with an explicit allow-list for the stored config. OmegaConf
is not needed: its classes are read as data by stand-ins registered under their qualified names,
which only receive their pickled state (no constructor or method of OmegaConf is run), then turned
into plain dicts and lists. Any other global in the file stops the load, naming it.

Mapping (timm checkpoint_filter_fn style, every tensor accounted for): each released tensor is
renamed, concatenated (BEiT's separate q / k / v into `qkv`; q and v biases, no k bias), verified and
dropped (index buffers, tied decoder weights), or it is an error naming it. Tensors the released
model does not have (the retrieval model's MLM head, the QA model's pooler norm) keep this model's
initialisation and are listed in model.json. The stored config becomes this project's settings:
token_drop_loc [3, 6, 9] (0-based layers) is prune_layers [4, 7, 10]; the released model's behaviour
is chosen wherever the two differ (docs/fidelity.md): pooling mean, a separate fusion norm, the
stored LayerNorm epsilon, the raw pruning score, interpolate_nearest temporal resize, no pruning of
QA questions. The multimodal keep rate is read where the released model reads it,
`text_encoder_args`; the released YAMLs' `joint_encoder_args` is never read by that code and is
only recorded.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from svitt.models.relative_position import relative_index, table_size, token_positions

KINDS = ("pretrain", "retrieval", "qa")
# Keys that identify each kind (all must be present).
SIGNATURES = {
    "pretrain": (
        "vision_encoder.embeddings.cls_token",
        "vision_layernorm.weight",
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.cls.predictions.bias",
        "vision_proj.weight",
        "itm_head.weight",
    ),
    "retrieval": (
        "vision_encoder.embeddings.cls_token",
        "vision_layernorm.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "vision_proj.weight",
        "itm_head.weight",
    ),
    "qa": (
        "vision_encoder.embeddings.cls_token",
        "vision_layernorm.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.bias",
    ),
}
CHECKPOINT_KEYS = ("model", "config")

# The released model's fixed choices, from the files it builds its encoders from: the Hugging Face
# config of microsoft/beit-base-patch16-224-pt22k-ft22k (plus models/sparse_config.py's sparsity
# defaults) and configs/config_bert.json. vision_encoder_args / text_encoder_args override them.
RELEASED_BEIT = dict(
    layer_norm_eps=1e-12,
    use_mean_pooling=True,
    use_relative_position_bias=True,
    use_shared_relative_position_bias=False,
    use_absolute_position_embeddings=False,
    use_mask_token=False,
    layer_scale_init_value=0.1,
    drop_path_rate=0.1,
    initializer_range=0.02,
    hidden_act="gelu",
    token_keep_rate=1,
    token_keep_strategy="cls_attn",
    token_drop_loc=[3, 6, 9],
    sparse_random_attn=None,
    sparse_local_attn=1,
    attn_block_size=1,
    num_cls_tokens=1,
    token_3d_order="none",
)
RELEASED_BERT = dict(
    fusion_layer=9,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    hidden_act="gelu",
    position_embedding_type="absolute",
    pad_token_id=0,
    initializer_range=0.02,
    token_keep_rate=1,
    token_keep_strategy="cls_attn",
    token_drop_loc=[9],
)
HEAD_DIM = 64  # BERT-base: 768 / 12; the stored config names only configs/config_bert.json's path
# Keys of vision_encoder_args / text_encoder_args whose value the tensors fix (sizes) or that do not
# change what the model computes; any other key than these and RELEASED_BEIT / RELEASED_BERT's is
# an error naming it rather than a guess.
SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "encoder_width",
    "out_indices",
    "pool_scales",
    "use_auxiliary_head",
    "auxiliary_loss_weight",
    "auxiliary_channels",
    "auxiliary_num_convs",
    "auxiliary_concat_input",
    "semantic_loss_ignore_index",
    "is_encoder_decoder",
    "use_cache",
    "classifier_dropout",
    "gradient_checkpointing",
)


class ReleasedCheckpointError(ValueError):
    """A released checkpoint this project cannot read or represent; the message names why."""


# ------------------------------------------------------------------------ the stored config
class _Pickled:
    """A pickled OmegaConf object read as data: the unpickler's BUILD fills __dict__ with the
    pickled state (`_content`, `_val`, `_metadata`, `_parent`); nothing of OmegaConf runs."""


class _DictConfig(_Pickled):
    pass


class _ListConfig(_Pickled):
    pass


class _ValueNode(_Pickled):
    pass


class _Metadata(_Pickled):
    pass


class _Marker:
    """A type the metadata names (typing.Any, dict, ...): kept as its name only."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


def _empty_mapping(*args):
    """collections.defaultdict(dict) of ContainerMetadata.resolver_cache: an empty cache."""
    return {}


_CONTAINERS = {"omegaconf.dictconfig.DictConfig": _DictConfig, "omegaconf.listconfig.ListConfig": _ListConfig}
_NODES = [f"omegaconf.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")]
_METADATA = ("omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata")
_TYPE_NAMES = (
    "typing.Any",
    "builtins.dict",
    "builtins.list",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.object",
)
_MARKERS = {name: _Marker(name) for name in _TYPE_NAMES}


def config_allow_list() -> list[tuple[object, str]]:
    """(stand-in, qualified name) pairs for torch.serialization.safe_globals: OmegaConf 2.x
    containers, plain value nodes and their metadata, the type markers the metadata names, and
    defaultdict for the resolver cache."""
    allowed = [(cls, name) for name, cls in _CONTAINERS.items()]
    allowed += [(_ValueNode, name) for name in _NODES] + [(_Metadata, name) for name in _METADATA]
    allowed += [(marker, name) for name, marker in _MARKERS.items()]
    return allowed + [(_empty_mapping, "collections.defaultdict")]


def to_plain(obj):
    """A stored config (stand-ins, or already plain data) -> dicts, lists and scalars. Strings stay
    as stored: interpolations ("${...}") and "???" are resolved or refused when a key is read."""
    if isinstance(obj, (_DictConfig, _ListConfig)):
        content = obj.__dict__.get("_content")
        if content is None or isinstance(content, str):
            return content
        if isinstance(obj, _DictConfig):
            return {key: to_plain(value) for key, value in content.items()}
        return [to_plain(value) for value in content]
    if isinstance(obj, _ValueNode):
        return to_plain(obj.__dict__.get("_val"))
    if isinstance(obj, dict):
        return {key: to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(value) for value in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise ReleasedCheckpointError(f"the stored config holds a {type(obj).__name__} ({obj!r}), not plain data")


def read_checkpoint(path: str | Path) -> dict:
    """The released checkpoint at `path` as {"model": state dict, "config": plain dict, and the
    other top-level entries}; torch.load(weights_only=True) with config_allow_list() only."""
    from pickle import UnpicklingError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"released checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(config_allow_list()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as error:  # torch's message suggests weights_only=False: name the global only
        text = str(error)
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        what = found.group(1) if found else text.splitlines()[0]
        raise ReleasedCheckpointError(
            f"{path} holds {what}, outside the allow-list (OmegaConf 2.x containers and plain value nodes, "
            "tensors, plain data); it is not loaded"
        ) from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ReleasedCheckpointError(
            f"{path} is not a checkpoint of the released SViTT training code: expected the top-level "
            f"keys {list(CHECKPOINT_KEYS)} (and optimizer, scheduler, scaler, epoch, global_step), found {found}"
        )
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleasedCheckpointError(f"{path}: 'model' is not a state dict of tensors")
    config = to_plain(checkpoint["config"])
    if not isinstance(config, dict):
        raise ReleasedCheckpointError(f"{path}: 'config' is not a mapping (got {type(config).__name__})")
    out = {k: v for k, v in checkpoint.items() if k in ("epoch", "global_step")}
    return {**out, "model": state, "config": config}


def _lookup(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def config_value(config: dict, dotted: str, default=None):
    """config[a][b]... with OmegaConf's plain `${a.b}` references resolved and the released
    code's "None" strings read as None (its convert_types); any other interpolation or a missing
    value ("???") is an error naming the key."""
    try:
        value = _lookup(config, dotted)
    except KeyError:
        return copy.deepcopy(default)
    for _ in range(10):  # a reference to a reference
        if not isinstance(value, str) or "${" not in value:
            break
        match = _INTERPOLATION.match(value)
        if not match:
            raise ReleasedCheckpointError(
                f"stored config key {dotted} is the interpolation {value!r}, which cannot be resolved without OmegaConf"
            )
        try:
            value = _lookup(config, match.group(1))
        except KeyError:
            raise ReleasedCheckpointError(
                f"stored config key {dotted} refers to {match.group(1)}, which the stored config does not hold"
            ) from None
    if value == "???":
        raise ReleasedCheckpointError(f"stored config key {dotted} is missing ('???')")
    if value in ("None", "none"):
        return None
    return copy.deepcopy(value)


# --------------------------------------------------------------------------- kinds and keys
def checkpoint_kind(state: dict) -> str:
    """Which released model a state dict is from (SIGNATURES); an error naming the keys expected
    and the key groups found otherwise."""
    matches = [kind for kind, keys in SIGNATURES.items() if all(k in state for k in keys)]
    if len(matches) == 1:
        return matches[0]
    groups = {}
    for key in state:
        group = ".".join(key.split(".")[:2])
        groups[group] = groups.get(group, 0) + 1
    found = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())) or "no tensors"
    expected = "; ".join(f"{kind}: {list(keys)}" for kind, keys in SIGNATURES.items())
    raise ReleasedCheckpointError(
        f"the state dict is none of the released models {list(KINDS)}: expected "
        f"the keys of one of {expected}; found the key groups {found}"
    )


def _layers(state: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def _text_prefix(kind: str) -> str:
    return "text_encoder.bert." if kind == "pretrain" else "text_encoder."


# ------------------------------------------------------------------------ config -> settings
def _unsupported(setting: str, value, why: str):
    raise ReleasedCheckpointError(
        f"the stored config sets {setting} = {value!r}, which this project does not implement: {why}"
    )


def _encoder_args(config: dict, section: str, defaults: dict, extra: tuple = ()) -> dict:
    stored = config_value(config, section, {}) or {}
    stored = {key: config_value(config, f"{section}.{key}") for key in stored}  # references, "None"
    unknown = sorted(set(stored) - set(defaults) - set(SIZE_KEYS) - set(extra))
    if unknown:
        raise ReleasedCheckpointError(
            f"the stored config's {section} sets {unknown}, which this converter does "
            f"not know how to represent; known: {sorted(set(defaults) | set(extra))}"
        )
    return {**defaults, **stored}


def _tensor(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ReleasedCheckpointError(f"the released checkpoint has no {key}")
    return state[key]


def _video_settings(config: dict, state: dict, notes: list[str]) -> dict:
    args = _encoder_args(
        config, "vision_encoder_args", RELEASED_BEIT, ("hidden_dropout_prob", "attention_probs_dropout_prob")
    )
    where = "vision_encoder_args."
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if args.get(key, 0.0):  # BEiT's are 0.0; this video encoder has no dropout
            _unsupported(where + key, args[key], "the video encoder has no dropout (BEiT's config: 0.0)")
    if config_value(config, "vit_type", "beit") != "beit":
        _unsupported("vit_type", config_value(config, "vit_type"), "only the BEiT video encoder exists here")
    checks = [
        ("token_3d_order", "none", "tokens are ordered in raster (t, h, w) order only"),
        ("num_cls_tokens", 1, "one [CLS] token"),
        (
            "use_mean_pooling",
            True,
            "the released pooled output with use_mean_pooling false "
            "(a CLS summary behind two LayerNorms) has no setting here",
        ),
        ("use_relative_position_bias", True, "BEiT's per-layer relative position bias is the only one"),
        ("use_shared_relative_position_bias", False, "one relative table per layer"),
        ("use_absolute_position_embeddings", False, "the released model adds a 2D embedding to video"),
        ("use_mask_token", False, "no masked image modelling"),
        ("hidden_act", "gelu", "GELU MLPs"),
    ]
    for key, supported, why in checks:
        if args[key] != supported:
            _unsupported(where + key, args[key], why)
    if args["token_keep_rate"] < 1 and args["token_keep_strategy"] != "cls_attn":
        _unsupported(where + "token_keep_strategy", args["token_keep_strategy"], "tokens are kept by CLS attention")
    sparse = args["sparse_random_attn"] is not None
    if sparse and args["sparse_local_attn"] != 1:
        _unsupported(
            where + "sparse_local_attn",
            args["sparse_local_attn"],
            "the released local window rolls around the ends of the sequence (circular); "
            "here a window is cut at the ends, which agrees only for K_l = 1",
        )
    prefix = "vision_encoder.encoder.layer."
    depth = len(_layers(state, prefix))
    proj = _tensor(state, "vision_encoder.embeddings.patch_embeddings.projection.weight")
    table = _tensor(state, prefix + "0.attention.attention.relative_position_bias.relative_position_bias_table")
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    drop_loc = list(args["token_drop_loc"] or [])
    bad = [loc for loc in drop_loc if not (isinstance(loc, int) and 0 <= loc < depth)]
    if bad:
        _unsupported(where + "token_drop_loc", drop_loc, f"layers are 0 .. {depth - 1}")
    if float(args["layer_norm_eps"]) != 1e-12:
        notes.append(
            f"{where}layer_norm_eps {args['layer_norm_eps']}: the released vision_layernorm keeps 1e-12; "
            "here the fusion norm uses layer_norm_eps too"
        )
    if sparse:
        notes.append(
            "edge sparsity: the released kernel leaves the padding of the last key block "
            "unmasked; here it is masked (docs/fidelity.md, point 5)"
        )
    fc1 = _tensor(state, prefix + "0.intermediate.dense.weight")
    return dict(
        frames=int(config_value(config, "video_input.num_frames", 1)),
        image_size=int(config_value(config, "image_res", 224)),
        patch_size=int(patch),
        tubelet_frames=1,
        in_chans=int(in_chans),
        abs_pos_embed=False,
        depth=depth,
        width=int(width),
        heads=int(table.shape[1]),
        mlp_ratio=fc1.shape[0] / width,
        qkv_bias=True,
        layer_scale_init=float(args["layer_scale_init_value"]) if args["layer_scale_init_value"] else None,
        drop_path=float(args["drop_path_rate"]),
        local_blocks=1 if sparse else None,
        random_blocks=int(args["sparse_random_attn"]) if sparse else None,
        block_size=int(args["attn_block_size"]) if sparse else None,
        visual_keep=float(args["token_keep_rate"]),
        prune_layers=[loc + 1 for loc in drop_loc],
        attention_kernel="auto",
        grad_checkpointing=False,
        seed=0,
        temporal="joint",
        init_std=float(args["initializer_range"]),
        layer_norm_eps=float(args["layer_norm_eps"]),
        pooling="mean",
        fusion_norm="separate",
        prune_score="raw",
        temporal_resize="interpolate_nearest",
    )


def _text_settings(config: dict, state: dict, kind: str, notes: list[str]) -> dict:
    args = _encoder_args(config, "text_encoder_args", RELEASED_BERT, ("attention_probs_dropout_prob",))
    where = "text_encoder_args."
    for key, supported, why in [
        ("hidden_act", "gelu", "GELU MLPs"),
        ("position_embedding_type", "absolute", "absolute text positions"),
    ]:
        if args[key] != supported:
            _unsupported(where + key, args[key], why)
    attn_dropout = args.get("attention_probs_dropout_prob", args["hidden_dropout_prob"])
    if attn_dropout != args["hidden_dropout_prob"]:
        _unsupported(
            where + "attention_probs_dropout_prob",
            attn_dropout,
            f"one text dropout rate (hidden_dropout_prob {args['hidden_dropout_prob']})",
        )
    prefix = _text_prefix(kind)
    layers = _layers(state, prefix + "encoder.layer.")
    depth = len(layers)
    fusion = [i for i in layers if f"{prefix}encoder.layer.{i}.crossattention.self.query.weight" in state]
    first = fusion[0] if fusion else depth
    if fusion != list(range(first, depth)) or first != args["fusion_layer"]:
        raise ReleasedCheckpointError(
            f"the text encoder has cross-attention in layers {fusion} but the stored config's "
            f"{where}fusion_layer is {args['fusion_layer']} (configs/config_bert.json: 9): expected every "
            f"layer from fusion_layer on"
        )
    words = _tensor(state, prefix + "embeddings.word_embeddings.weight")
    width = int(words.shape[1])
    heads = args.get("num_attention_heads") or width // HEAD_DIM
    if "num_attention_heads" not in args:
        notes.append(f"text heads: {heads} (width {width} / head dim {HEAD_DIM}, as configs/config_bert.json)")
    rate = float(args["token_keep_rate"])
    if rate < 1 and args["token_keep_strategy"] != "cls_attn":
        _unsupported(where + "token_keep_strategy", args["token_keep_strategy"], "tokens are kept by CLS attention")
    prune = []
    for loc in args["token_drop_loc"] or []:
        if first <= loc < depth - 1:
            prune.append(loc - first + 1)
        elif rate < 1:  # the released model ignores these: no cross-attention there, or nothing after it
            notes.append(
                f"{where}token_drop_loc {loc}: not a fusion layer followed by another, which the "
                "released model does not prune after either; left out"
            )
    joint = config_value(config, "joint_encoder_args")
    if joint:
        notes.append(
            f"joint_encoder_args {joint} is not read by the released model (it reads "
            f"{where.rstrip('.')}); not applied here either (docs/fidelity.md, point 8)"
        )
    inter = _tensor(state, f"{prefix}encoder.layer.0.intermediate.dense.weight")
    return dict(
        vocab_size=int(words.shape[0]),
        width=width,
        depth=depth,
        heads=int(heads),
        intermediate_size=int(inter.shape[0]),
        fusion_layers=depth - first,
        max_position_embeddings=int(_tensor(state, prefix + "embeddings.position_embeddings.weight").shape[0]),
        type_vocab_size=int(_tensor(state, prefix + "embeddings.token_type_embeddings.weight").shape[0]),
        dropout=float(args["hidden_dropout_prob"]),
        layer_norm_eps=float(args["layer_norm_eps"]),
        pad_token_id=int(args["pad_token_id"]),
        multimodal_keep=rate if prune else 1.0,
        multimodal_prune_layers=prune or [1],
        init_std=float(args["initializer_range"]),
        question_pruning=False,
    )


def model_config(config: dict, state: dict, kind: str) -> tuple[dict, list[str]]:
    """This project's `model` section for a released checkpoint, and notes on what it records."""
    notes = []
    video = _video_settings(config, state, notes)
    text = _text_settings(config, state, kind, notes)
    proj = state.get("vision_proj.weight")
    embed_dim = int(proj.shape[0]) if proj is not None else int(config_value(config, "embed_dim", 256))
    model = dict(
        video=video,
        text=text,
        embed_dim=embed_dim,
        temperature=float(config_value(config, "temp", 0.07)),
        video_weights=None,
        text_weights=None,
    )
    return model, notes


# ------------------------------------------------------------------------------ tensor mapping
_VISION_RULES = [  # after "vision_encoder.": (pattern, our name under "video_encoder.")
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.bias", r"blocks.\1.attn.q_bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.bias", r"blocks.\1.attn.v_bias"),
    (
        r"encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_bias_table",
        r"blocks.\1.attn.relative_position_bias_table",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.lambda_([12])", r"blocks.\1.gamma_\2"),
    (r"pooler\.layernorm\.(weight|bias)", r"norm.\1"),  # BEiT's fc_norm: the mean-pooling norm
]
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight")
_INDEX = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_index")
_BERT_PART = re.compile(
    r"(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\."
    r"(weight|bias)|encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|"
    r"output\.(dense|LayerNorm))\.(weight|bias)|encoder\.layer\.\d+\.(intermediate|output)\."
    r"(dense|LayerNorm)\.(weight|bias))"
)
_HEADS = {
    "vision_proj.weight": "vision_proj.weight",
    "vision_proj.bias": "vision_proj.bias",
    "text_proj.weight": "text_proj.weight",
    "text_proj.bias": "text_proj.bias",
    "temp": "temp",
    "itm_head.weight": "vtm_head.weight",
    "itm_head.bias": "vtm_head.bias",
    "vision_layernorm.weight": "video_encoder.fusion_norm.weight",
    "vision_layernorm.bias": "video_encoder.fusion_norm.bias",
}
_LM_HEAD = {
    "transform.dense.weight": "transform.dense.weight",
    "transform.dense.bias": "transform.dense.bias",
    "transform.LayerNorm.weight": "transform.LayerNorm.weight",
    "transform.LayerNorm.bias": "transform.LayerNorm.bias",
    "bias": "bias",
}
_DECODER_HEAD = {
    "transform.dense.weight": "transform.0.weight",
    "transform.dense.bias": "transform.0.bias",
    "transform.LayerNorm.weight": "transform.2.weight",
    "transform.LayerNorm.bias": "transform.2.bias",
    "bias": "bias",
}


class _Mapping:
    """The converted tensors, and an account of every released tensor that was not copied."""

    def __init__(self, state: dict):
        self.state = state
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.verified: dict[str, str] = {}

    def copy(self, source: str, target: str):
        self.out[target] = self.state[source]
        self.used.add(source)

    def verify(self, source: str, expected: torch.Tensor, what: str):
        value = self.state[source]
        same = value is expected  # tied tensors load as one object
        if not same and (value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected)):
            raise ReleasedCheckpointError(f"{source} is not {what}: this project cannot represent the checkpoint")
        self.verified[source] = what
        self.used.add(source)

    def unmapped(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _map_vision(m: _Mapping, grid: tuple[int, int, int]):
    pos = torch.cat([torch.tensor([-1]), token_positions(grid)])
    raster_index = None
    qkv: dict[int, dict[str, str]] = {}
    for key in [k for k in m.state if k.startswith("vision_encoder.")]:
        name = key[len("vision_encoder.") :]
        match = _QKV.fullmatch(name)
        if match:
            qkv.setdefault(int(match.group(1)), {})[match.group(2)] = key
            continue
        if _INDEX.fullmatch(name):  # a buffer: check the layout it encodes is this project's
            if raster_index is None:
                raster_index = relative_index(pos[:, None], pos[None, :], grid)
            m.verify(key, raster_index, f"the raster-order relative position index of the grid {grid}")
            continue
        for pattern, repl in _VISION_RULES:
            if re.fullmatch(pattern, name):
                m.copy(key, "video_encoder." + re.sub(pattern, repl, name))
                break
    for layer, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            continue  # incomplete: the missing part is reported, the others stay unmapped
        m.out[f"video_encoder.blocks.{layer}.attn.qkv.weight"] = torch.cat(
            [m.state[parts[p]] for p in ("query", "key", "value")], dim=0
        )
        m.used.update(parts.values())


def _map_bert(m: _Mapping, prefix: str, target: str, layers: str = "encoder.layer."):
    """BERT tensors under `prefix` (HF names, as ours) -> `target`, its layers under `layers`;
    the position_ids buffer verified."""
    for key in [k for k in m.state if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if name == "embeddings.position_ids":
            length = m.state[key].shape[-1]
            m.verify(key, torch.arange(length).expand(1, -1), "the positions 0 .. L-1 (a buffer)")
        elif _BERT_PART.fullmatch(name):
            if name.startswith("encoder.layer."):
                name = layers + name[len("encoder.layer.") :]
            m.copy(key, target + name)


def _map_lm_head(m: _Mapping, prefix: str, target: str, names: dict, words: str):
    """An MLM / LM head (cls.predictions) -> target; its decoder is tied to the word embeddings."""
    for name, ours in names.items():
        if prefix + name in m.state:
            m.copy(prefix + name, target + ours)
    if prefix + "decoder.weight" in m.state:
        m.verify(prefix + "decoder.weight", m.state[words], f"tied to {words}")
    if prefix + "decoder.bias" in m.state:
        m.verify(prefix + "decoder.bias", m.state[prefix + "bias"], f"tied to {prefix}bias")


def map_state_dict(state: dict, kind: str, grid: tuple[int, int, int]) -> tuple[dict, dict]:
    """A released state dict -> (this project's tensors, verified {released name: what}). Every
    released tensor is copied, concatenated or verified; any other is an error naming it."""
    m = _Mapping(state)
    _map_vision(m, grid)
    for source, target in _HEADS.items():
        if source in state:
            m.copy(source, target)
    _map_bert(m, _text_prefix(kind), "text_encoder.")
    if kind == "pretrain":
        _map_lm_head(
            m,
            "text_encoder.cls.predictions.",
            "mlm_head.",
            _LM_HEAD,
            "text_encoder.bert.embeddings.word_embeddings.weight",
        )
    if kind == "qa":
        _map_bert(m, "text_decoder.bert.", "answer_decoder.", layers="layer.")
        _map_lm_head(
            m,
            "text_decoder.cls.predictions.",
            "answer_decoder.",
            _DECODER_HEAD,
            "text_decoder.bert.embeddings.word_embeddings.weight",
        )
    unmapped = m.unmapped()
    if unmapped:
        raise ReleasedCheckpointError(
            f"{len(unmapped)} tensors of the released {kind} checkpoint have no place "
            f"in this project's model: {unmapped}"
        )
    return m.out, m.verified


# ------------------------------------------------------------------------------- conversion
# Tensors this project's models hold that a released model of the kind does not; they keep the
# fresh model's initialisation.
NOT_IN_RELEASED = {
    "retrieval": ("mlm_head.", "the released retrieval model has no MLM head (not used by retrieval)"),
    "qa": (
        "video_encoder.norm.",
        "the released QA model deletes BEiT's pooler (the mean-pooling norm): QA reads only the fusion tokens",
    ),
}


def build_target(model_cfg: dict, kind: str, decoder_layers: int | None = None) -> torch.nn.Module:
    """This project's model for a released kind: SViTT, or VideoQA for qa (seeded: the tensors the
    released model lacks get the same initialisation every time)."""
    from svitt.models.answer_decoder import VideoQA
    from svitt.models.svitt import SViTT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VideoQA(model_cfg, decoder_layers) if kind == "qa" else SViTT(model_cfg)


def convert(checkpoint: dict, source: str = "") -> tuple[torch.nn.Module, dict]:
    """read_checkpoint()'s result -> (this project's model holding the weights, model.json info)."""
    state, config = checkpoint["model"], checkpoint["config"]
    kind = checkpoint_kind(state)
    model_cfg, notes = model_config(config, state, kind)
    video = model_cfg["video"]
    grid = (video["frames"], video["image_size"] // video["patch_size"], video["image_size"] // video["patch_size"])
    table = state[
        "vision_encoder.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"
    ]  # present: model_config read it
    if table.shape[0] != table_size(grid):
        raise ReleasedCheckpointError(
            f"the relative position tables have {table.shape[0]} rows, but the stored config's "
            f"video_input.num_frames {grid[0]} and image_res {video['image_size']} give the grid {grid} "
            f"({table_size(grid)} rows)"
        )
    tensors, verified = map_state_dict(state, kind, grid)
    decoder_layers = len(_layers(state, "text_decoder.bert.encoder.layer.")) if kind == "qa" else None
    model = build_target(model_cfg, kind, decoder_layers)
    target = model.state_dict()
    fresh_prefix, fresh_reason = NOT_IN_RELEASED.get(kind, (None, None))
    initialised = sorted(k for k in target if k not in tensors and fresh_prefix and k.startswith(fresh_prefix))
    missing = sorted(set(target) - set(tensors) - set(initialised))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise ReleasedCheckpointError(
            f"the released {kind} checkpoint does not fill this project's model: "
            f"missing {missing}, unexpected {unexpected}"
        )
    bad = [
        f"{k}: released {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in tensors.items()
        if v.shape != target[k].shape
    ]
    if bad:
        raise ReleasedCheckpointError(
            "released tensors do not fit the model built from the stored config:\n  " + "\n  ".join(bad)
        )
    model.load_state_dict({**{k: target[k] for k in initialised}, **tensors})
    info = _info(
        config,
        checkpoint,
        kind,
        model.cfg,
        source,
        notes,
        verified,  # model.cfg: resolved
        {k: fresh_reason for k in initialised},
        decoder_layers,
    )
    return model.eval(), info


def _text_len(config: dict, kind: str) -> int:
    if kind == "qa":
        return int(config_value(config, "max_q_len", 25))
    length = config_value(config, "max_txt_l", 32)
    return int(length.get("video", 32) if isinstance(length, dict) else length)


def _info(config, checkpoint, kind, model_cfg, source, notes, verified, initialised, decoder_layers) -> dict:
    """model.json: this project's keys (name, frames, model_config, train_config) and the provenance."""
    from svitt.training.keys import DATA_KEYS, QA_DATA_KEYS

    data = {key: copy.deepcopy(default) for key, (_, default) in DATA_KEYS.items()}
    data.update(text_len=_text_len(config, kind), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # BEiT's
    train = {"task": "qa" if kind == "qa" else "pairs", "data": data}
    if kind == "qa":
        data["answer_len"] = int(config_value(config, "max_a_len", QA_DATA_KEYS["answer_len"][1]))
        train["decoder_layers"] = decoder_layers
    stored = {
        k: config_value(config, k)
        for k in (
            "vit_type",
            "image_res",
            "embed_dim",
            "temp",
            "video_input",
            "vision_encoder_args",
            "text_encoder_args",
            "joint_encoder_args",
            "bert_config",
            "text_encoder",
            "text_decoder",
        )
        if _has(config, k)
    }
    return {
        "name": Path(source).stem if source else f"released_{kind}",
        "steps": checkpoint.get("global_step"),
        "frames": model_cfg["video"]["frames"],
        "model_config": model_cfg,
        "train_config": train,
        "released": {
            "source": str(source),
            "kind": kind,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "stored_config": stored,
            "notes": notes,
            "initialised": initialised,
            "verified": verified,
        },
    }


def _has(config: dict, key: str) -> bool:
    try:
        _lookup(config, key)
        return True
    except KeyError:
        return False


def import_released(checkpoint: str | Path, out_dir: str | Path) -> dict:
    """Convert a released checkpoint into out_dir/model.safetensors and out_dir/model.json (the
    JSON last; its name is out_dir's), loadable by svitt.training.checkpoint.load_exported. Returns the info."""
    from svitt.training.checkpoint import export_model

    model, info = convert(read_checkpoint(checkpoint), str(checkpoint))
    info["name"] = Path(out_dir).name
    export_model(model, out_dir, info)
    return info
