"""The BitFit paper's bias terms and presets, and the explicit per-architecture maps that find them.

Every bias is found by a full-match pattern on its parameter name *relative to the backbone*
(``model.base_model``), built from the module path of that bias in the architecture's layer
(paper, Appendix A.1). Nothing here matches ``'bias' in name``: that over-selects (heads,
adapters, relative-position tables) and hides a wrong map.

Terms
-----
Per layer ``l`` (paper, Sec. 3): ``q``, ``k``, ``v`` (attention query/key/value), ``m1``
(attention output dense), ``LN1`` (attention output LayerNorm), ``m2`` (intermediate dense),
``m3`` (output dense), ``LN2`` (output LayerNorm). Outside the layers: ``emb`` (the embedding
LayerNorm bias, plus ELECTRA's embedding projection and DeBERTa-v2's relative-embedding
LayerNorm) and ``pool`` (the pooler dense bias of BERT-style backbones). The paper's "all bias
terms" (and its HF code) include the embedding LayerNorm and the pooler, so the ``bitfit`` /
``all`` presets do too; ``layers`` is the per-layer terms only.

Decoder families (GPT-2, OPT, BLOOM, Qwen2, GPT-NeoX) and MPNet/ALBERT map onto the same terms:
``m1`` is the attention output projection, ``m2``/``m3`` the MLP up/down projections, ``LN1``/``LN2``
the LayerNorm of the attention/MLP sublayer (before it in pre-LN stacks, after it in BERT). Two
terms exist for them only: ``qkv``, a *fused* query/key/value projection (GPT-2's ``c_attn``,
BLOOM's and GPT-NeoX's ``query_key_value``), whose one bias vector holds all three, so ``q``,
``k`` and ``v`` cannot be chosen apart there; and ``final``, the LayerNorm after the last layer of
a pre-LN stack (``ln_f``, ``final_layer_norm``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from ..utils.errors import UsageError

LAYER_TERMS: tuple[str, ...] = ("q", "k", "v", "m1", "LN1", "m2", "m3", "LN2", "qkv")
GLOBAL_TERMS: tuple[str, ...] = ("emb", "pool", "final")
TERMS: tuple[str, ...] = LAYER_TERMS + GLOBAL_TERMS

#: Named subsets. A preset selects the terms the architecture has (RoBERTa's classification
#: model has no pooler); an explicitly requested term that matches nothing raises.
PRESETS: dict[str, tuple[str, ...]] = {
    "bitfit": TERMS,
    "all": TERMS,
    "layers": LAYER_TERMS,
    "qm2": ("q", "m2"),
    "attention": ("q", "k", "v", "qkv", "m1", "LN1"),
    "mlp": ("m2", "m3", "LN2"),
}


#: Presets that mean "every bias of the backbone": they work on architectures without a map.
ALL_BIASES_PRESETS = frozenset({"bitfit", "all"})


@dataclass(frozen=True)
class BiasMap:
    """Where each BitFit term lives in one architecture.

    ``layer_prefix`` is a regex for the path of one transformer layer relative to the backbone,
    with one group capturing the layer index (e.g. ``r"encoder\\.layer\\.(\\d+)"``).
    ``layer_modules`` maps a per-layer term to the module path inside the layer whose ``bias``
    it is (or several paths, e.g. DeBERTa's content and position query projections).
    ``global_modules`` maps ``emb``/``pool`` to module paths relative to the backbone.
    """

    layer_prefix: str
    layer_modules: Mapping[str, str | Sequence[str]]
    global_modules: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: A fused query/key/value projection (module path inside the layer) whose one bias vector is
    #: ``[q; k; v]``: the terms ``q``/``k``/``v`` select their slice of it, ``qkv`` the whole.
    fused_qkv: str | None = None
    #: The sizes of the q, k and v parts of ``fused_qkv``'s output, read from the model config.
    qkv_sizes: Callable[[Any], tuple[int, int, int]] | None = None
    #: Config flags that build biases the architecture lacks by default (``attention_bias``,
    #: ``mlp_bias``, ``norm_bias``): what lets a delta with added biases merge into a standard model.
    config_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = (set(self.layer_modules) - set(LAYER_TERMS)) | (
            set(self.global_modules) - set(GLOBAL_TERMS)
        )
        if unknown:
            raise ValueError(
                f"BiasMap names unknown term(s) {sorted(unknown)}; per-layer terms are "
                f"{list(LAYER_TERMS)} and global terms are {list(GLOBAL_TERMS)}."
            )
        if (self.fused_qkv is None) != (self.qkv_sizes is None):
            raise ValueError("BiasMap.fused_qkv and BiasMap.qkv_sizes go together: the fused projection's path "
                             "and the sizes of its q, k and v parts.")
        if re.compile(self.layer_prefix).groups != 1:
            raise ValueError(
                f"BiasMap.layer_prefix {self.layer_prefix!r} must have exactly one group "
                "capturing the layer index, e.g. r'encoder\\.layer\\.(\\d+)'."
            )

    def module_patterns(self) -> dict[str, re.Pattern[str]]:
        """One full-match pattern per term over backbone-relative *module* names: the modules whose
        ``bias`` the term is (or, for a module built without one, would be)."""

        def alts(paths: str | Sequence[str]) -> str:
            return "|".join(re.escape(p) for p in ([paths] if isinstance(paths, str) else paths))

        out = {term: re.compile(rf"{self.layer_prefix}\.(?:{alts(paths)})")
               for term, paths in self.layer_modules.items()}
        for term, paths in self.global_modules.items():
            out[term] = re.compile(rf"(?:{alts(paths)})")
        if self.fused_qkv is not None:
            for term in ("q", "k", "v"):
                out.setdefault(term, re.compile(rf"{self.layer_prefix}\.{re.escape(self.fused_qkv)}"))
        return out


_BERT_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "m1": "attention.output.dense",
    "LN1": "attention.output.LayerNorm",
    "m2": "intermediate.dense",
    "m3": "output.dense",
    "LN2": "output.LayerNorm",
}
_BERT = BiasMap(
    layer_prefix=r"encoder\.layer\.(\d+)",
    layer_modules=_BERT_LAYER,
    global_modules={"emb": ["embeddings.LayerNorm"], "pool": ["pooler.dense"]},
)

def _gqa_qkv_sizes(config: Any) -> tuple[int, int, int]:
    """q, k, v widths of a fused projection under grouped-query attention (Phi-3's qkv_proj)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * head_dim, kv * head_dim, kv * head_dim


_LLAMA_STYLE = BiasMap(
    layer_prefix=r"layers\.(\d+)",
    layer_modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "m1": "self_attn.o_proj",
                   # A gated MLP has two intermediate projections, the gate and the up projection.
                   "m2": ["mlp.gate_proj", "mlp.up_proj"], "m3": "mlp.down_proj",
                   "LN1": "input_layernorm", "LN2": "post_attention_layernorm"},
    global_modules={"final": ["norm"]},
    config_flags=("attention_bias", "mlp_bias"),
)

# T5 / mT5 / Flan-T5 (encoder-decoder, built without biases): one layer prefix for encoder and decoder blocks
# (a layer index names encoder block i and decoder block i alike). q/k/v/m1 take both the self-attention and the
# decoder's cross-attention (EncDecAttention) projections, m2 the MLP input (wi; wi_0 and wi_1 where the MLP is
# gated, as in T5 v1.1 and Flan-T5), m3 its output (wo). Their norms are T5LayerNorm, an RMS norm with a scale and
# no bias: LN1/LN2/final are skipped like Llama's RMSNorms. relative_attention_bias is a position table (an
# Embedding), not a bias term: never selected. No config flag builds T5 biases, so a delta with added ones
# cannot merge into a T5 model (the merge says so).
_T5 = BiasMap(
    layer_prefix=r"(?:encoder|decoder)\.block\.(\d+)",
    layer_modules={
        **{t: [f"layer.0.SelfAttention.{m}", f"layer.1.EncDecAttention.{m}"]
           for t, m in (("q", "q"), ("k", "k"), ("v", "v"), ("m1", "o"))},
        "m2": [f"layer.{i}.DenseReluDense.{w}" for i in (1, 2) for w in ("wi", "wi_0", "wi_1")],
        "m3": ["layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"],
        # The self-attention's pre-norm; the decoder's cross-attention and MLP pre-norms, the encoder's MLP one.
        "LN1": "layer.0.layer_norm", "LN2": ["layer.1.layer_norm", "layer.2.layer_norm"],
    },
    global_modules={"final": ["encoder.final_layer_norm", "decoder.final_layer_norm"]},
)

# Read-only: a new architecture goes through register_bias_map (or bias_map=), not by editing this table.
DEFAULT_BIAS_MAPS: Mapping[str, BiasMap] = MappingProxyType({
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": BiasMap(
        layer_prefix=r"encoder\.layer\.(\d+)",
        layer_modules=_BERT_LAYER,
        # ELECTRA-small projects 128-d embeddings up to the hidden size: an embedding-side bias.
        global_modules={"emb": ["embeddings.LayerNorm", "embeddings_project"]},
    ),
    "distilbert": BiasMap(
        layer_prefix=r"transformer\.layer\.(\d+)",
        layer_modules={
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "m1": "attention.out_lin",
            "LN1": "sa_layer_norm",
            "m2": "ffn.lin1",
            "m3": "ffn.lin2",
            "LN2": "output_layer_norm",
        },
        global_modules={"emb": ["embeddings.LayerNorm"]},
    ),
    "mpnet": BiasMap(
        layer_prefix=r"encoder\.layer\.(\d+)",
        layer_modules={"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
                       "m1": "attention.attn.o", "LN1": "attention.LayerNorm", "m2": "intermediate.dense",
                       "m3": "output.dense", "LN2": "output.LayerNorm"},
        global_modules={"emb": ["embeddings.LayerNorm"], "pool": ["pooler.dense"]},
    ),
    "albert": BiasMap(
        # ALBERT shares one layer (per group) across depth: the group index is the "layer".
        layer_prefix=r"encoder\.albert_layer_groups\.(\d+)\.albert_layers\.\d+",
        layer_modules={"q": "attention.query", "k": "attention.key", "v": "attention.value",
                       "m1": "attention.dense", "LN1": "attention.LayerNorm", "m2": "ffn", "m3": "ffn_output",
                       "LN2": "full_layer_layer_norm"},
        global_modules={"emb": ["embeddings.LayerNorm", "encoder.embedding_hidden_mapping_in"],
                        "pool": ["pooler"]},
    ),
    "gpt2": BiasMap(
        layer_prefix=r"h\.(\d+)",
        layer_modules={"qkv": "attn.c_attn", "m1": "attn.c_proj", "LN1": "ln_1", "m2": "mlp.c_fc",
                       "m3": "mlp.c_proj", "LN2": "ln_2"},
        global_modules={"final": ["ln_f"]},
    ),
    "opt": BiasMap(
        layer_prefix=r"decoder\.layers\.(\d+)",
        layer_modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                       "m1": "self_attn.out_proj", "LN1": "self_attn_layer_norm", "m2": "fc1", "m3": "fc2",
                       "LN2": "final_layer_norm"},
        global_modules={"final": ["decoder.final_layer_norm"]},
    ),
    "bloom": BiasMap(
        layer_prefix=r"h\.(\d+)",
        layer_modules={"qkv": "self_attention.query_key_value", "m1": "self_attention.dense",
                       "LN1": "input_layernorm", "m2": "mlp.dense_h_to_4h", "m3": "mlp.dense_4h_to_h",
                       "LN2": "post_attention_layernorm"},
        global_modules={"emb": ["word_embeddings_layernorm"], "final": ["ln_f"]},
    ),
    # Qwen2: only the q/k/v projections have biases (RMSNorm and the other Linears have none).
    "qwen2": BiasMap(
        layer_prefix=r"layers\.(\d+)",
        layer_modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
    ),
    # Built without biases (attention_bias / mlp_bias / norm_bias False by default): BitFit adds zero-initialised
    # ones where a term has none (BitFitConfig.add_missing_biases). Their norms are RMSNorms, which have no bias.
    "llama": _LLAMA_STYLE,
    "mistral": dataclasses.replace(_LLAMA_STYLE, config_flags=()),
    "qwen3": dataclasses.replace(_LLAMA_STYLE, config_flags=("attention_bias",)),
    "gemma3_text": dataclasses.replace(
        _LLAMA_STYLE, config_flags=("attention_bias",),
        layer_modules={**_LLAMA_STYLE.layer_modules, "LN1": ["input_layernorm", "post_attention_layernorm"],
                       "LN2": ["pre_feedforward_layernorm", "post_feedforward_layernorm"]}),
    "phi3": BiasMap(
        layer_prefix=r"layers\.(\d+)",
        layer_modules={"qkv": "self_attn.qkv_proj", "m1": "self_attn.o_proj", "LN1": "input_layernorm",
                       "m2": "mlp.gate_up_proj", "m3": "mlp.down_proj", "LN2": "post_attention_layernorm"},
        global_modules={"final": ["norm"]},
        fused_qkv="self_attn.qkv_proj", qkv_sizes=_gqa_qkv_sizes,
    ),
    "modernbert": BiasMap(
        layer_prefix=r"layers\.(\d+)",
        # Layer 0's attn_norm is an Identity (the embedding norm precedes it); Wi is the fused GLU input.
        layer_modules={"qkv": "attn.Wqkv", "m1": "attn.Wo", "LN1": "attn_norm", "m2": "mlp.Wi", "m3": "mlp.Wo",
                       "LN2": "mlp_norm"},
        global_modules={"emb": ["embeddings.norm"], "final": ["final_norm"]},
        fused_qkv="attn.Wqkv", qkv_sizes=lambda c: (c.hidden_size,) * 3,
        config_flags=("attention_bias", "mlp_bias", "norm_bias"),
    ),
    "gpt_neox": BiasMap(
        layer_prefix=r"layers\.(\d+)",
        layer_modules={"qkv": "attention.query_key_value", "m1": "attention.dense", "LN1": "input_layernorm",
                       "m2": "mlp.dense_h_to_4h", "m3": "mlp.dense_4h_to_h", "LN2": "post_attention_layernorm"},
        global_modules={"final": ["final_layer_norm"]},
    ),
    "t5": _T5,
    "mt5": _T5,
    "deberta-v2": BiasMap(
        layer_prefix=r"encoder\.layer\.(\d+)",
        layer_modules={
            **_BERT_LAYER,
            # With share_att_key=False (DeBERTa-v2), positions get their own query/key
            # projections; they are the query/key biases of the position stream.
            "q": ["attention.self.query_proj", "attention.self.pos_query_proj"],
            "k": ["attention.self.key_proj", "attention.self.pos_key_proj"],
            "v": "attention.self.value_proj",
        },
        # encoder.LayerNorm normalises the shared relative-position embeddings (v3).
        global_modules={"emb": ["embeddings.LayerNorm", "encoder.LayerNorm"]},
    ),
})

_user_maps: dict[str, BiasMap] = {}


def register_bias_map(model_type: str, bias_map: BiasMap, *, overwrite: bool = False) -> None:
    """Teach BitFit a new architecture (keyed by ``config.model_type``), like ``AutoModel.register``.

    Alternatively pass ``bias_map=`` directly to :func:`select_bias_parameters` or
    :class:`~bitfit_tasks.BitFitTrainer`, which needs no registration at all.
    """
    if not overwrite and (model_type in DEFAULT_BIAS_MAPS or model_type in _user_maps):
        raise ValueError(
            f"a bias map for model_type {model_type!r} exists already; pass overwrite=True "
            "to replace it."
        )
    _user_maps[model_type] = bias_map


def supported_model_types() -> list[str]:
    return sorted({*DEFAULT_BIAS_MAPS, *_user_maps})


def resolve_terms(terms: str | Iterable[str]) -> tuple[list[str], bool]:
    """Expand presets and comma lists into paper terms.

    Returns the terms and whether they came from a preset only (a preset tolerates terms the
    architecture lacks, e.g. ``pool`` on RoBERTa's classifier, where there is no pooler).
    """
    items = [terms] if isinstance(terms, str) else list(terms)
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not tokens:
        raise UsageError(
            f"no bias terms given; choose a preset {sorted(PRESETS)} or terms {list(TERMS)}."
        )
    out: list[str] = []
    from_preset = True
    lower_terms = {t.lower(): t for t in TERMS}
    for tok in tokens:
        if tok in PRESETS:
            out.extend(PRESETS[tok])
        elif tok.lower() in lower_terms:
            out.append(lower_terms[tok.lower()])
            from_preset = False
        else:
            raise UsageError(
                f"unknown bias term or preset {tok!r}; terms are {list(TERMS)} "
                f"(paper notation, Appendix A.1) and presets are {sorted(PRESETS)}."
            )
    return list(dict.fromkeys(out)), from_preset


def bias_map_for(model_type: str | None) -> BiasMap | None:
    """The bias map of ``config.model_type``: a registered one first, then the built-in."""
    return _user_maps.get(model_type) or DEFAULT_BIAS_MAPS.get(model_type)


def find_bias_map(model: nn.Module, bias_map: BiasMap | None) -> BiasMap | None:
    if bias_map is not None:
        return bias_map
    return bias_map_for(getattr(getattr(model, "config", None), "model_type", None))


def get_bias_map(model: nn.Module, bias_map: BiasMap | None) -> BiasMap:
    found = find_bias_map(model, bias_map)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if found is None:
        raise UsageError(
            f"BitFit has no per-term bias map for model_type {model_type!r} "
            f"({type(model).__name__}); supported: {supported_model_types()}. The 'bitfit'/'all' preset "
            "(every backbone bias) works without one; for per-term subsets register one with "
            "bitfit_tasks.register_bias_map(model_type, BiasMap(...)) or pass bias_map=."
        )
    return found
