"""The architecture description (``flatquant/models/args.py``): the family table (:data:`FAMILIES`) and the per-layer
tensors a family adds (:data:`LAYER_TENSORS`) are the one declaration of a family's facts; loading, folding, random
models, checkpoints and the engine read them generically, and the family's math lives in
:func:`flatquant.models.layer.qk_pre_rope`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import flatquant
from flatquant.models.args import FAMILIES, LAYER_TENSORS, SUPPORTED_ARCHITECTURES, Family, ModelArgs, layer_tensors
from tests.helpers import TINY

TINY_QWEN3 = dataclasses.replace(TINY, arch="qwen3", qk_norm=True)


def test_families_are_the_supported_architectures_and_set_modelargs_options() -> None:
    assert SUPPORTED_ARCHITECTURES == tuple(FAMILIES)
    arg_fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
    for f in dataclasses.fields(Family):  # every family option is a ModelArgs option with the same default
        assert f.name in arg_fields and arg_fields[f.name].default is False and f.default is False
    assert FAMILIES["qwen2"] == Family(qkv_bias=True) and FAMILIES["qwen3"] == Family(qk_norm=True)
    assert FAMILIES["llama"] == FAMILIES["mistral"] == Family()
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        dataclasses.replace(TINY, arch="gpt2")


def test_layer_tensors_are_declared_with_a_family_flag_and_a_shape() -> None:
    assert len({e.name for e in LAYER_TENSORS}) == len({(e.hf_name, e.flag) for e in LAYER_TENSORS}) == len(
        LAYER_TENSORS)  # an HF name may recur under another option (another shape or math), a layer-dict key not
    family_options = {f.name for f in dataclasses.fields(Family)}
    for e in LAYER_TENSORS:
        assert e.flag in family_options  # some family turns it on
        assert isinstance(getattr(TINY, e.dim), int)
    assert layer_tensors(TINY) == ()
    assert [(e.name, e.hf_name, e.shape(TINY_QWEN3)) for e in layer_tensors(TINY_QWEN3)] == [
        ("q_norm", "self_attn.q_norm.weight", (TINY.head_dim,)),
        ("k_norm", "self_attn.k_norm.weight", (TINY.head_dim,))]


def test_family_facts_are_named_only_in_args_and_the_layer_math() -> None:
    """No source file but this table (args.py) and the family math (layer.py) names a family's layer tensors, their
    flags or an architecture: everything else reads the tables."""
    root = Path(flatquant.__file__).parent
    words = ({f'"{e.name}"' for e in LAYER_TENSORS} | {f".{e.name}" for e in LAYER_TENSORS}
             | {e.flag for e in LAYER_TENSORS} | {f'"{a}"' for a in FAMILIES})
    allowed = {Path("models/args.py"), Path("models/layer.py")}
    found = {(str(p.relative_to(root)), w) for p in root.rglob("*.py") if p.relative_to(root) not in allowed
             for w in words if w in p.read_text()}
    assert not found
