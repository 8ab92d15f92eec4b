from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import ARCHS, tiny_model

from bitfit_tasks import (
    PRESETS,
    TERMS,
    BiasMap,
    BitFitConfig,
    prepare_model,
    register_bias_map,
    select_bias_parameters,
)
from bitfit_tasks.core.bias_maps import _user_maps
from bitfit_tasks.core.selection import head_parameter_names, layer_index

# Written out by hand from each architecture's module tree (not derived from the library's maps).
BERT_LAYER = {
    "q": ["attention.self.query"], "k": ["attention.self.key"], "v": ["attention.self.value"],
    "m1": ["attention.output.dense"], "LN1": ["attention.output.LayerNorm"],
    "m2": ["intermediate.dense"], "m3": ["output.dense"], "LN2": ["output.LayerNorm"],
}
EXPECTED = {
    "bert": ("bert.encoder.layer.{i}.", BERT_LAYER,
             {"emb": ["bert.embeddings.LayerNorm"], "pool": ["bert.pooler.dense"]},
             ["classifier"]),
    "roberta": ("roberta.encoder.layer.{i}.", BERT_LAYER,
                {"emb": ["roberta.embeddings.LayerNorm"]},
                ["classifier.dense", "classifier.out_proj"]),
    "xlm-roberta": ("roberta.encoder.layer.{i}.", BERT_LAYER,
                    {"emb": ["roberta.embeddings.LayerNorm"]},
                    ["classifier.dense", "classifier.out_proj"]),
    "electra": ("electra.encoder.layer.{i}.", BERT_LAYER,
                {"emb": ["electra.embeddings.LayerNorm", "electra.embeddings_project"]},
                ["classifier.dense", "classifier.out_proj"]),
    "distilbert": ("distilbert.transformer.layer.{i}.", {
        "q": ["attention.q_lin"], "k": ["attention.k_lin"], "v": ["attention.v_lin"],
        "m1": ["attention.out_lin"], "LN1": ["sa_layer_norm"], "m2": ["ffn.lin1"],
        "m3": ["ffn.lin2"], "LN2": ["output_layer_norm"]},
        {"emb": ["distilbert.embeddings.LayerNorm"]}, ["pre_classifier", "classifier"]),
    "deberta-v2": ("deberta.encoder.layer.{i}.", {
        **BERT_LAYER,
        "q": ["attention.self.query_proj", "attention.self.pos_query_proj"],
        "k": ["attention.self.key_proj", "attention.self.pos_key_proj"],
        "v": ["attention.self.value_proj"]},
        {"emb": ["deberta.embeddings.LayerNorm", "deberta.encoder.LayerNorm"]},
        ["pooler.dense", "classifier"]),
}


def expected_names(arch: str, term: str) -> set[str]:
    prefix, layer, glob, _ = EXPECTED[arch]
    if term in layer:
        return {prefix.format(i=i) + m + ".bias" for i in range(2) for m in layer[term]}
    return {m + ".bias" for m in glob.get(term, [])}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("term", TERMS)
def test_each_term_selects_expected_names(arch, term):
    model = tiny_model(arch)
    want = expected_names(arch, term)
    if not want:  # e.g. RoBERTa's classifier model has no pooler
        with pytest.raises(ValueError, match=f"bias term '{term}' matches no parameter"):
            select_bias_parameters(model, [term])
        return
    got = select_bias_parameters(model, [term])
    assert set(got) == {term}
    assert set(got[term]) == want
    params = dict(model.named_parameters())
    assert all(params[n].dim() == 1 for n in got[term])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_select_expected_names(arch, preset):
    model = tiny_model(arch)
    got = select_bias_parameters(model, preset)
    want = set().union(*(expected_names(arch, t) for t in PRESETS[preset]))
    assert {n for names in got.values() for n in names} == want


@pytest.mark.parametrize("arch", ARCHS)
def test_bitfit_covers_every_backbone_bias_and_no_head(arch):
    model = tiny_model(arch)
    got = {n for names in select_bias_parameters(model, "bitfit").values() for n in names}
    backbone = {id(p) for p in model.base_model.parameters()}
    assert got == {n for n, p in model.named_parameters() if n.endswith(".bias") and id(p) in backbone}
    head = set(head_parameter_names(model))
    assert head == {m + s for m in EXPECTED[arch][3] for s in (".weight", ".bias")}
    assert not got & head


def test_comma_and_case_insensitive_terms(bert):
    got = select_bias_parameters(bert, ["q,M2", "ln1"])
    assert list(got) == ["q", "m2", "LN1"]


def test_token_and_qa_heads_are_outside_backbone():
    assert set(head_parameter_names(tiny_model("bert", "tok"))) == {"classifier.weight", "classifier.bias"}
    assert set(head_parameter_names(tiny_model("roberta", "qa"))) == {
        "qa_outputs.weight", "qa_outputs.bias"}


def test_layer_index(bert):
    assert layer_index(bert, "bert.encoder.layer.1.intermediate.dense.bias") == 1
    assert layer_index(bert, "bert.pooler.dense.bias") is None


def test_paper_parameter_fractions_bert_base():
    """bert-base: all biases ~0.09% (102,912 of 109.5M), q+m2 ~0.04% (paper, Sec. 3 and Table 3)."""
    with torch.device("meta"):
        model = T.BertModel(T.BertConfig())
    total = sum(p.numel() for p in model.parameters())
    assert total == 109_482_240
    n_all = sum(dict(model.named_parameters())[n].numel()
                for names in select_bias_parameters(model, "bitfit").values() for n in names)
    n_qm2 = sum(dict(model.named_parameters())[n].numel()
                for names in select_bias_parameters(model, "qm2").values() for n in names)
    assert n_all == 12 * (7 * 768 + 3072) + 768 + 768 == 102_912
    assert n_qm2 == 12 * (768 + 3072) == 46_080
    assert round(100 * n_all / total, 2) == 0.09
    assert round(100 * n_qm2 / total, 2) == 0.04


# ---- errors -------------------------------------------------------------------------------

def test_unknown_term_or_preset(bert):
    with pytest.raises(ValueError, match=r"unknown bias term or preset 'qq'.*presets are"):
        select_bias_parameters(bert, ["qq"])
    with pytest.raises(ValueError, match=r"unknown bias term or preset 'bitfits'"):
        BitFitConfig(bias_terms=["bitfits"])


def test_term_the_architecture_lacks():
    with pytest.raises(ValueError, match=r"bias term 'pool' matches no parameter of "
                                         r"RobertaForSequenceClassification.*Drop 'pool'"):
        select_bias_parameters(tiny_model("roberta"), ["q", "pool"])


def tiny_bart():
    cfg = T.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return T.BartForSequenceClassification(cfg)


def test_architecture_without_map_all_biases_or_clear_error(caplog):
    """No per-term map (BART): 'bitfit'/'all' trains every backbone bias; a per-term subset is an error."""
    model = tiny_bart()
    with caplog.at_level("INFO", logger="bitfit_tasks"):
        got = select_bias_parameters(model, "bitfit")
    assert list(got) == ["all"]
    backbone_biases = {"model." + n for n, p in model.model.named_parameters() if n.endswith(".bias")}
    assert set(got["all"]) == backbone_biases and not set(got["all"]) & set(head_parameter_names(model))
    assert "per-term subsets (q, m2, ...) need a map" in caplog.text
    with pytest.raises(ValueError, match=r"no per-term bias map for model_type 'bart'.*'bitfit'/'all' preset "
                                         r"\(every backbone bias\) works without one.*register_bias_map"):
        select_bias_parameters(model, "qm2")
    state = prepare_model(model, BitFitConfig())
    assert state.term_counts["all"] == sum(p.numel() for n, p in model.named_parameters() if n in backbone_biases)


def test_model_without_any_bias():
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no bias parameters in its backbone"):
        select_bias_parameters(T.LlamaForCausalLM(cfg), "bitfit")


def test_nothing_trainable(bert):
    with pytest.raises(ValueError, match=r"leaves nothing trainable"):
        BitFitConfig(mode="frozen", train_head=False)
    roberta = tiny_model("roberta")
    with pytest.raises(ValueError, match=r"bias term 'pool' matches no parameter"):
        prepare_model(roberta, BitFitConfig(bias_terms=["pool"], train_head=False))
    with pytest.raises(ValueError, match=r"mode 'frozen' .* leaves nothing trainable in BertModel"):
        prepare_model(T.BertModel(bert.config), BitFitConfig(mode="frozen"))
    with pytest.raises(ValueError, match=r"no bias terms given"):
        select_bias_parameters(bert, [" , "])


def test_bad_mode_and_head_lr():
    with pytest.raises(ValueError, match=r"unknown mode 'prefix'; choose one of"):
        BitFitConfig(mode="prefix")
    with pytest.raises(ValueError, match=r"head_learning_rate must be > 0"):
        BitFitConfig(head_learning_rate=0.0)


def test_bias_map_validation():
    with pytest.raises(ValueError, match=r"unknown term\(s\) \['z'\]"):
        BiasMap(layer_prefix=r"h\.(\d+)", layer_modules={"z": "attn"})
    with pytest.raises(ValueError, match=r"exactly one group"):
        BiasMap(layer_prefix=r"h\.\d+", layer_modules={"q": "attn"})


def test_register_map_for_new_architecture():
    """BART has biases but no per-term map: registering one makes the terms work on it."""
    model = tiny_bart()
    bart = BiasMap(
        layer_prefix=r"encoder\.layers\.(\d+)",
        layer_modules={"q": "self_attn.q_proj", "m2": "fc1", "m3": "fc2"},
        global_modules={"emb": ["encoder.layernorm_embedding"]},
    )
    try:
        register_bias_map("bart", bart)
        with pytest.raises(ValueError, match=r"exists already; pass overwrite=True"):
            register_bias_map("bart", bart)
        got = select_bias_parameters(model, "qm2")
        assert got == {"q": ["model.encoder.layers.0.self_attn.q_proj.bias"],
                       "m2": ["model.encoder.layers.0.fc1.bias"]}
    finally:
        _user_maps.pop("bart", None)
    # Without registering: passed explicitly.
    assert "m3" in select_bias_parameters(model, "all", bias_map=bart)
