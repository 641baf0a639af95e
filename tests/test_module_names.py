"""How module paths are matched (PEFT's rules), checked against PEFT's own functions."""

import pytest
from peft.tuners.tuners_utils import check_target_module_exists

from lorakit import LoraConfig, LorakitError
from lorakit.module_names import block_index, parse_layers, parse_parameters

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.0.w1",
         "model.layers.12.mlp.experts.3.w1", "transformer.h.2.attn.c_attn", "h.1.attn.c_attn",
         "bert.encoder.layer.3.attention.self.query", "model.vision.blocks.2.attn.qkv", "lm_head", "q_proj",
         "model.decoder.layers.4.encoder_attn.q_proj"]


class _Peft:  # the attributes check_target_module_exists reads
    def __init__(self, **kw):
        self.exclude_modules = None
        self.modules_to_save = None
        self.target_parameters = None
        self.__dict__.update(kw)


@pytest.mark.parametrize("layers", [[1], 0, [2, 12], 3, [4]])
@pytest.mark.parametrize("pattern", [None, "layers", ["h", "blocks"], "layer"])
def test_a_block_is_selected_exactly_as_peft_selects_it(layers, pattern):
    names = ["q_proj", "w1", "c_attn", "query", "qkv", "lm_head"]
    ours = LoraConfig(target_modules=names, layers_to_transform=layers, layers_pattern=pattern)
    theirs = _Peft(target_modules=names, layers_to_transform=layers, layers_pattern=pattern)
    for path in PATHS:
        assert ours.targets(path) == bool(check_target_module_exists(theirs, path)), path


def test_the_first_numbered_segment_is_the_block():
    assert block_index("model.layers.1.mlp.experts.0.w1") == 1
    assert block_index("model.layers.12.mlp.experts.3.w1", "experts") == 3
    assert block_index("lm_head") is None and block_index("h.1.attn.c_attn") is None
    assert block_index("h.1.attn.c_attn", "h") == 1


def test_blocks_typed_on_a_command_line():
    assert parse_layers("11") == [11] and parse_layers(" 8-10, 2 ,9") == [2, 8, 9, 10]
    assert parse_layers(None) is None and parse_layers([3, 1]) == [3, 1]
    for bad in ("", "a", "3-1", "1,", "-2", "1.5"):
        with pytest.raises(LorakitError, match="is not a block index or a range"):
            parse_layers(bad)


def test_parameters_typed_on_a_command_line():
    assert parse_parameters(" experts.gate_up_proj, experts.down_proj,") == ["experts.gate_up_proj",
                                                                              "experts.down_proj"]
    assert parse_parameters(None) is None and parse_parameters(["gate.weight"]) == ["gate.weight"]
    with pytest.raises(LorakitError, match="name none"):
        parse_parameters(" , ")
