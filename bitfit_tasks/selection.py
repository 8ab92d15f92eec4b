"""Bias-term selection in the BitFit paper's notation, over explicit per-architecture maps.

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
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import UsageError

logger = logging.getLogger("bitfit_tasks")

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


def bias_parameter_ids(module: nn.Module) -> set[int]:
    """ids of every ``bias`` parameter a submodule owns (by attribute, not by name)."""
    return {id(m.bias) for m in module.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}


def has_bias_parameters(model: nn.Module) -> bool:
    return bool(bias_parameter_ids(model))


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained encoder inside a task model (``model.base_model``), or the model itself."""
    return getattr(model, "base_model", model)


def bias_map_for(model_type: str | None) -> BiasMap | None:
    """The bias map of ``config.model_type``: a registered one first, then the built-in."""
    return _user_maps.get(model_type) or DEFAULT_BIAS_MAPS.get(model_type)


def _find_bias_map(model: nn.Module, bias_map: BiasMap | None) -> BiasMap | None:
    if bias_map is not None:
        return bias_map
    return bias_map_for(getattr(getattr(model, "config", None), "model_type", None))


def _get_bias_map(model: nn.Module, bias_map: BiasMap | None) -> BiasMap:
    found = _find_bias_map(model, bias_map)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if found is None:
        raise UsageError(
            f"BitFit has no per-term bias map for model_type {model_type!r} "
            f"({type(model).__name__}); supported: {supported_model_types()}. The 'bitfit'/'all' preset "
            "(every backbone bias) works without one; for per-term subsets register one with "
            "bitfit_tasks.register_bias_map(model_type, BiasMap(...)) or pass bias_map=."
        )
    return found


def full_names(model: nn.Module) -> dict[str, str]:
    """Backbone-relative parameter name -> full name in ``model``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {n: by_id[id(p)] for n, p in backbone_of(model).named_parameters() if id(p) in by_id}


#: Module types BitFit can give a bias they were built without: both add their bias last, so a
#: zero bias leaves their output unchanged and a merged model has it in the usual place.
ADDABLE_BIAS_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)


def bias_size(module: nn.Module) -> int | None:
    """The length of the bias ``module`` could be given (None: it cannot take one)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return int(torch.Size(shape).numel()) if shape else None
    return None


@dataclass
class BiasSelection:
    """What a BitFit term selection trains: ``terms`` maps each term to full parameter names (some
    may not exist yet: ``added`` lists the biases BitFit adds, name -> length), and ``slices`` the
    (start, stop) ranges of a fused q/k/v bias that q/k/v alone train (absent: the whole tensor)."""

    terms: dict[str, list[str]]
    added: dict[str, int] = field(default_factory=dict)
    slices: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: Term -> number of bias values it trains.
    counts: dict[str, int] = field(default_factory=dict)


_TURN_ON = ("turn it on (--add_missing_biases true; BitFitConfig(add_missing_biases=True); "
            "select_bias_parameters(..., add_missing=True))")


def _rmsnorm_reason(term: str, kinds: list[str]) -> str:
    return (f"bias term {term!r} is a norm without a bias ({', '.join(sorted(set(kinds)))}): an RMSNorm has no "
            "bias term, and BitFit adds none to it, since no model class of these families holds one (such a "
            "delta could neither merge nor export) and a shift of a pre-norm's output (LN1 before attention, LN2 "
            "before the MLP) equals a change of the next projections' biases, which BitFit trains.")


def plan_bias_selection(
    model: nn.Module,
    terms: str | Iterable[str] = "bitfit",
    *,
    bias_map: BiasMap | None = None,
    add_missing: bool = False,
) -> BiasSelection:
    """Map each requested term to the full names of the bias parameters it selects.

    Pure: reads module and parameter names only, changes nothing. With ``add_missing``, a term's
    Linear/LayerNorm built without a bias (Llama, ModernBERT, Mistral, ...) is selected too, its
    name listed in ``added`` for :func:`~bitfit_tasks.core.add_biases` to create. Raises
    ``ValueError`` for an unknown term or preset, a model with nothing to train, an architecture
    without a map, or an explicitly requested term the architecture does not have.
    """
    wanted, from_preset = resolve_terms(terms)
    backbone = backbone_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found_map = _find_bias_map(model, bias_map)
    if not has_bias_parameters(backbone) and not (add_missing and found_map is not None):
        if found_map is not None:
            raise UsageError(
                f"{type(model).__name__} has no bias parameters in its backbone (model_type {model_type!r} is built "
                f"without them) and add_missing_biases is off, so BitFit has nothing to train; {_TURN_ON} to add "
                "zero-initialised biases and train them.")
        raise UsageError(
            f"{type(model).__name__} has no bias parameters in its backbone and BitFit has no per-term bias map "
            f"for model_type {model_type!r} that would say where to add them; supported: {supported_model_types()}. "
            "Register one with bitfit_tasks.register_bias_map(model_type, BiasMap(...)) or pass bias_map=.")
    tokens = {t.strip() for item in ([terms] if isinstance(terms, str) else terms) for t in str(item).split(",")}
    rel_to_full = full_names(model)
    params = dict(backbone.named_parameters())
    if found_map is None and tokens - {""} <= ALL_BIASES_PRESETS:
        # "All biases" needs no per-term map: every bias a backbone module owns.
        ids = bias_parameter_ids(backbone)
        names = [rel_to_full[n] for n, p in backbone.named_parameters() if id(p) in ids and n in rel_to_full]
        if names:
            logger.info("no per-term bias map for model_type %r: training every backbone bias (%d tensors) "
                        "as term 'all'; per-term subsets (q, m2, ...) need a map (register_bias_map).",
                        model_type, len(names))
            sizes = {n: p.numel() for n, p in model.named_parameters()}
            return BiasSelection({"all": names}, counts={"all": sum(sizes[n] for n in names)})
    bmap = _get_bias_map(model, bias_map)
    patterns = bmap.module_patterns()
    modules = dict(backbone.named_modules())
    prefix = full_prefix(model)
    fused = re.compile(rf"{bmap.layer_prefix}\.{re.escape(bmap.fused_qkv)}") if bmap.fused_qkv else None
    sel = BiasSelection(terms={})
    native = native_parameter_names(model) if add_missing else None
    sizes: dict[str, int] = {}
    unbiasable: dict[str, list[str]] = {}

    def candidates(term: str) -> list[str]:
        """Backbone-relative bias names of ``term``, existing or (with add_missing) addable."""
        pat = patterns.get(term)
        out = []
        for mod_name, mod in modules.items():
            if pat is None or not pat.fullmatch(mod_name):
                continue
            rel = f"{mod_name}.bias" if mod_name else "bias"
            if rel in params:
                out.append(rel)
                sizes[prefix + rel] = params[rel].numel()
                if native is not None and prefix + rel not in native:  # added earlier (a delta applied, a re-run)
                    sel.added[prefix + rel] = params[rel].numel()
            elif add_missing and isinstance(mod, ADDABLE_BIAS_TYPES) and getattr(mod, "bias", None) is None \
                    and bias_size(mod):
                out.append(rel)
                sel.added[prefix + rel] = sizes[prefix + rel] = bias_size(mod)
            elif bias_size(mod) is None and not isinstance(mod, nn.Identity):  # e.g. an RMSNorm
                unbiasable.setdefault(term, []).append(type(mod).__name__)
        return out

    for term in wanted:
        names = candidates(term)
        full = [rel_to_full.get(n, prefix + n) for n in names]
        if fused is not None and term in ("q", "k", "v"):
            if "qkv" in wanted:  # the whole fused bias is trained anyway: q/k/v add nothing
                continue
            part = ("q", "k", "v").index(term)
            for name in full:
                widths = bmap.qkv_sizes(model.config)
                if sum(widths) != sizes[name]:
                    raise UsageError(f"BiasMap.qkv_sizes gives {widths} for {name}, whose bias has {sizes[name]} "
                                     "values; fix the bias map's qkv_sizes.")
                start = sum(widths[:part])
                sel.slices.setdefault(name, []).append((start, start + widths[part]))
            sel.counts[term] = sum(bmap.qkv_sizes(model.config)[part] for _ in full)
        else:
            sel.counts[term] = sum(sizes[n] for n in full)
        if full:
            sel.terms[term] = full
        else:
            sel.counts.pop(term, None)
        if not full and not from_preset:
            have = [t for t in TERMS if t in patterns and any(
                patterns[t].fullmatch(m) and (f"{m}.bias" in params or (add_missing and bias_size(mod)))
                for m, mod in modules.items())]
            if term in unbiasable:
                raise UsageError(_rmsnorm_reason(term, unbiasable[term]) + f" Drop {term!r} from --bias_terms; the "
                                 f"terms this model has are {have}.")
            pat = patterns.get(term)
            if pat is not None and any(pat.fullmatch(m) and bias_size(mod) for m, mod in modules.items()):
                raise UsageError(
                    f"bias term {term!r} has no bias in {type(model).__name__} (model_type {model_type!r} is built "
                    f"without it) and add_missing_biases is off; {_TURN_ON} to add and train one, or drop {term!r} "
                    f"(the terms it has now: {have}).")
            raise UsageError(
                f"bias term {term!r} matches no parameter of {type(model).__name__} "
                f"(model_type {model_type!r}); the terms this model has are {have}. Drop {term!r} or use a "
                "preset such as 'bitfit'."
            )
    if not sel.terms:
        raise UsageError(
            f"bias terms {wanted} select no parameter of {type(model).__name__}; check the "
            "bias map for this architecture."
        )
    skipped = [t for t in wanted if t not in sel.terms and t in LAYER_TERMS and t != "qkv"
               and not (fused is not None and t in ("q", "k", "v") and "qkv" in sel.terms)]
    norms = [t for t in skipped if t in unbiasable]
    if norms:
        logger.info("%s: %s skipped. %s", type(model).__name__, norms, _rmsnorm_reason("/".join(norms),
                    [k for t in norms for k in unbiasable[t]]))
    skipped = [t for t in skipped if t not in unbiasable]
    # "Every bias" presets take what the model has; a named subset (qm2, attention, mlp) that loses a
    # term trains less than its name says.
    fused_only = "qkv" in sel.terms and set(skipped) <= {"q", "k", "v"}
    if skipped and not fused_only and not tokens <= ALL_BIASES_PRESETS | {"layers", ""}:
        # e.g. qm2 on GPT-2: it has no separate query bias, so the preset trains less than its name says.
        logger.warning("preset %s: %s has no %s bias term(s), skipped; fused q/k/v projections are the "
                       "term 'qkv'.", terms, type(model).__name__, skipped)
    return sel


def select_bias_parameters(
    model: nn.Module,
    terms: str | Iterable[str] = "bitfit",
    *,
    bias_map: BiasMap | None = None,
    add_missing: bool = False,
) -> dict[str, list[str]]:
    """Term -> full names of the biases it selects (see :func:`plan_bias_selection`)."""
    return plan_bias_selection(model, terms, bias_map=bias_map, add_missing=add_missing).terms


def native_parameter_names(model: nn.Module) -> set[str] | None:
    """The parameter names ``model``'s class builds from its config (a skeleton on the meta device, no
    memory), so a bias BitFit added earlier is told apart from the model's own; None for a model
    without a config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        return None
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception:  # a class that cannot be rebuilt from its config alone: assume nothing was added
        return None
    return {n for n, _ in skeleton.named_parameters()}


def added_bias_sizes(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Which of ``names`` are biases ``model``'s own class does not build (BitFit added them), with lengths."""
    native = native_parameter_names(model)
    params = dict(model.named_parameters())
    if native is None:
        return {}
    return {n: params[n].numel() for n in names if n.endswith(".bias") and n in params and n not in native}


def full_prefix(model: nn.Module) -> str:
    """The backbone's name inside ``model`` plus a dot ('' when the model is its own backbone)."""
    backbone = backbone_of(model)
    if backbone is model:
        return ""
    for name, mod in model.named_children():
        if mod is backbone:
            return name + "."
    return ""


def layer_index(model: nn.Module, full_name: str, *, bias_map: BiasMap | None = None) -> int | None:
    """Layer number of a per-layer bias (for the Figure 1 analysis), else ``None``."""
    layer_re = re.compile(_get_bias_map(model, bias_map).layer_prefix)
    prefix = full_prefix(model)
    # A bias BitFit would add is not a parameter yet: its name is the backbone's prefix + the relative name.
    rel = {v: k for k, v in full_names(model).items()}.get(full_name, full_name.removeprefix(prefix))
    m = layer_re.match(rel)
    return int(m.group(1)) if m else None


def head_parameter_names(model: nn.Module) -> list[str]:
    """The task head: every parameter outside the pretrained backbone.

    That is ``classifier`` (BERT, ELECTRA/RoBERTa's two-layer head), ``qa_outputs``,
    DistilBERT's ``pre_classifier``, DeBERTa's ``pooler`` + ``classifier``: whatever the task
    class added on top of ``model.base_model``.
    """
    in_backbone = set(full_names(model).values())
    return [n for n, _ in model.named_parameters() if n not in in_backbone]
