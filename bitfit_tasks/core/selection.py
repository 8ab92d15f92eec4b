"""Bias selection over the per-architecture maps (:mod:`.bias_maps`): which parameters a term list trains
in a model, the biases BitFit adds where a model was built without them, fused q/k/v slices, and the
names of a model's task head. A term that matches nothing raises."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..utils.errors import UsageError
from .bias_maps import (
    ALL_BIASES_PRESETS,
    LAYER_TERMS,
    TERMS,
    BiasMap,
    find_bias_map,
    get_bias_map,
    resolve_terms,
    supported_model_types,
)
from .skeleton import meta_skeleton

logger = logging.getLogger("bitfit_tasks")


def bias_parameter_ids(module: nn.Module) -> set[int]:
    """ids of every ``bias`` parameter a submodule owns (by attribute, not by name)."""
    return {id(m.bias) for m in module.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}


def has_bias_parameters(model: nn.Module) -> bool:
    return bool(bias_parameter_ids(model))


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained encoder inside a task model (``model.base_model``), or the model itself."""
    return getattr(model, "base_model", model)


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
    found_map = find_bias_map(model, bias_map)
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
    bmap = get_bias_map(model, bias_map)
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
        skeleton = meta_skeleton(type(model), config)
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
    layer_re = re.compile(get_bias_map(model, bias_map).layer_prefix)
    prefix = full_prefix(model)
    # A bias BitFit would add is not a parameter yet: its name is the backbone's prefix + the relative name.
    rel = {v: k for k, v in full_names(model).items()}.get(full_name, full_name.removeprefix(prefix))
    m = layer_re.match(rel)
    return int(m.group(1)) if m else None


def backbone_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the pretrained backbone's parameters. Most task classes hold their backbone as one child
    (``model.base_model``); a few are their own backbone (T5ForConditionalGeneration, T5ForQuestionAnswering:
    ``shared``, ``encoder``, ``decoder`` beside ``lm_head`` / ``qa_outputs``): there the backbone is what the
    family's bare model class (T5Model) also holds, read off its skeleton on the meta device."""
    if backbone_of(model) is not model:
        return set(full_names(model).values())
    bare = _bare_children(model)
    names = [n for n, _ in model.named_parameters()]
    return set(names) if bare is None else {n for n in names if n.split(".", 1)[0] in bare}


def _bare_children(model: nn.Module) -> set[str] | None:
    """The top-level children of the bare model class of ``model``'s family, or None where that is ``model``'s
    own class or cannot be told (no config, a family transformers' AutoModel does not map)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        from transformers import MODEL_MAPPING

        bare_cls = MODEL_MAPPING[type(config)]
    except (ImportError, KeyError):
        return None
    if isinstance(model, bare_cls):
        return None
    own = {n for n, _ in model.named_children()}
    cached = model.__dict__.get("_bitfit_bare_children")
    if cached is None or cached[0] is not config:
        try:
            children = {n for n, _ in meta_skeleton(bare_cls, config).named_children()}
        except Exception:  # a bare class that cannot be built from this config: the model is its own backbone
            return None
        cached = model.__dict__["_bitfit_bare_children"] = (config, children)
    # Only a task class that holds the bare class's children itself (T5's shared, encoder, decoder) is its own
    # backbone this way; one built otherwise (Llama4ForCausalLM's model + lm_head) is not read by this rule.
    return cached[1] if cached[1] <= own else None


def lm_head_parameter_names(model: nn.Module) -> list[str]:
    """A language model's pretrained output head: every parameter outside the backbone of a model with output
    embeddings (``lm_head`` of a causal LM, ``cls.predictions`` of a masked LM). It is part of the base, frozen
    and not stored, unless ``train_lm_head`` asks for it; a tied head is the embedding matrix, in the backbone."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        has_lm_head = callable(get) and get() is not None
    except (AttributeError, NotImplementedError):  # a class that declares none
        has_lm_head = False
    if not has_lm_head:
        return []
    in_backbone = backbone_parameter_names(model)
    return [n for n, _ in model.named_parameters() if n not in in_backbone]


def head_parameter_names(model: nn.Module) -> list[str]:
    """The task head: every parameter outside the pretrained backbone that is not a language model's pretrained
    output head (:func:`lm_head_parameter_names`).

    That is ``classifier`` (BERT, ELECTRA/RoBERTa's two-layer head), ``qa_outputs``,
    DistilBERT's ``pre_classifier``, DeBERTa's ``pooler`` + ``classifier``: whatever the task
    class added on top of ``model.base_model``. A causal or masked LM has none.
    """
    in_backbone = backbone_parameter_names(model)
    lm_head = set(lm_head_parameter_names(model))
    return [n for n, _ in model.named_parameters() if n not in in_backbone and n not in lm_head]
