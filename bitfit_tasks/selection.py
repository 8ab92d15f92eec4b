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
``all`` presets do too; ``layers`` is the eight per-layer terms only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

LAYER_TERMS: tuple[str, ...] = ("q", "k", "v", "m1", "LN1", "m2", "m3", "LN2")
GLOBAL_TERMS: tuple[str, ...] = ("emb", "pool")
TERMS: tuple[str, ...] = LAYER_TERMS + GLOBAL_TERMS

#: Named subsets. A preset selects the terms the architecture has (RoBERTa's classification
#: model has no pooler); an explicitly requested term that matches nothing raises.
PRESETS: dict[str, tuple[str, ...]] = {
    "bitfit": TERMS,
    "all": TERMS,
    "layers": LAYER_TERMS,
    "qm2": ("q", "m2"),
    "attention": ("q", "k", "v", "m1", "LN1"),
    "mlp": ("m2", "m3", "LN2"),
}


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

    def __post_init__(self) -> None:
        unknown = (set(self.layer_modules) - set(LAYER_TERMS)) | (
            set(self.global_modules) - set(GLOBAL_TERMS)
        )
        if unknown:
            raise ValueError(
                f"BiasMap names unknown term(s) {sorted(unknown)}; per-layer terms are "
                f"{list(LAYER_TERMS)} and global terms are {list(GLOBAL_TERMS)}."
            )
        if re.compile(self.layer_prefix).groups != 1:
            raise ValueError(
                f"BiasMap.layer_prefix {self.layer_prefix!r} must have exactly one group "
                "capturing the layer index, e.g. r'encoder\\.layer\\.(\\d+)'."
            )

    def patterns(self) -> dict[str, re.Pattern[str]]:
        """One full-match pattern per term over backbone-relative parameter names."""

        def alts(paths: str | Sequence[str]) -> str:
            return "|".join(re.escape(p) for p in ([paths] if isinstance(paths, str) else paths))

        out = {
            term: re.compile(rf"{self.layer_prefix}\.(?:{alts(paths)})\.bias")
            for term, paths in self.layer_modules.items()
        }
        for term, paths in self.global_modules.items():
            out[term] = re.compile(rf"(?:{alts(paths)})\.bias")
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

DEFAULT_BIAS_MAPS: dict[str, BiasMap] = {
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
}

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
        raise ValueError(
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
            raise ValueError(
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


def _get_bias_map(model: nn.Module, bias_map: BiasMap | None) -> BiasMap:
    if bias_map is not None:
        return bias_map
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    found = _user_maps.get(model_type) or DEFAULT_BIAS_MAPS.get(model_type)
    if found is None:
        raise ValueError(
            f"BitFit has no bias map for model_type {model_type!r} "
            f"({type(model).__name__}); supported: {supported_model_types()}. Register one with "
            "bitfit_tasks.register_bias_map(model_type, BiasMap(...)) or pass bias_map=."
        )
    return found


def full_names(model: nn.Module) -> dict[str, str]:
    """Backbone-relative parameter name -> full name in ``model``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {n: by_id[id(p)] for n, p in backbone_of(model).named_parameters() if id(p) in by_id}


def select_bias_parameters(
    model: nn.Module,
    terms: str | Iterable[str] = "bitfit",
    *,
    bias_map: BiasMap | None = None,
) -> dict[str, list[str]]:
    """Map each requested term to the full names of the bias parameters it selects.

    Pure: reads parameter names only, changes nothing. Raises ``ValueError`` for an unknown
    term or preset, a model with no bias parameters, an architecture without a map, or an
    explicitly requested term the architecture does not have.
    """
    wanted, from_preset = resolve_terms(terms)
    if not has_bias_parameters(model):
        raise ValueError(
            f"{type(model).__name__} has no bias parameters at all (Llama-style models are built "
            "without them), so BitFit has nothing to train. Use a model with biases (BERT, "
            "RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2) or another PEFT method."
        )
    patterns = _get_bias_map(model, bias_map).patterns()
    rel_to_full = full_names(model)
    selected: dict[str, list[str]] = {}
    for term in wanted:
        pat = patterns.get(term)
        names = [rel_to_full[n] for n in rel_to_full if pat is not None and pat.fullmatch(n)]
        if names:
            selected[term] = names
        elif not from_preset:
            have = [t for t in TERMS if t in patterns and any(map(patterns[t].fullmatch, rel_to_full))]
            raise ValueError(
                f"bias term {term!r} matches no parameter of {type(model).__name__} "
                f"(model_type {getattr(model.config, 'model_type', None)!r}); the terms this "
                f"model has are {have}. Drop {term!r} or use a preset such as 'bitfit'."
            )
    if not selected:
        raise ValueError(
            f"bias terms {wanted} select no parameter of {type(model).__name__}; check the "
            "bias map for this architecture."
        )
    return selected


def layer_index(model: nn.Module, full_name: str, *, bias_map: BiasMap | None = None) -> int | None:
    """Layer number of a per-layer bias (for the Figure 1 analysis), else ``None``."""
    prefix = re.compile(_get_bias_map(model, bias_map).layer_prefix)
    rel = {v: k for k, v in full_names(model).items()}.get(full_name, full_name)
    m = prefix.match(rel)
    return int(m.group(1)) if m else None


def head_parameter_names(model: nn.Module) -> list[str]:
    """The task head: every parameter outside the pretrained backbone.

    That is ``classifier`` (BERT, ELECTRA/RoBERTa's two-layer head), ``qa_outputs``,
    DistilBERT's ``pre_classifier``, DeBERTa's ``pooler`` + ``classifier``: whatever the task
    class added on top of ``model.base_model``.
    """
    in_backbone = set(full_names(model).values())
    return [n for n, _ in model.named_parameters() if n not in in_backbone]


def unmapped_biases(model: nn.Module, *, bias_map: BiasMap | None = None) -> list[str]:
    """Backbone biases that no term of the map covers (a map to extend, or a part to ignore)."""
    patterns = list(_get_bias_map(model, bias_map).patterns().values())
    bias_ids = bias_parameter_ids(backbone_of(model))
    by_id = {id(p): n for n, p in backbone_of(model).named_parameters()}
    rel_to_full = full_names(model)
    return [rel_to_full[by_id[i]] for i in bias_ids
            if i in by_id and not any(p.fullmatch(by_id[i]) for p in patterns)]
