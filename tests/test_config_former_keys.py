"""Former config field names (StrictConfig.former_keys).

Every tower config names its MLP width `intermediate_size` and its norm epsilon `norm_eps` (GLM also
`max_position_embeddings`); YAMLs written before that rename still load, to the same config.
"""
import os

import pytest
import yaml

from visual_mllm.configuration import ConflictingConfigKeyError
from visual_mllm.llm.glm import GLMConfig
from visual_mllm.llm.llama import LlamaConfig
from visual_mllm.llm.qwen import QwenConfig
from visual_mllm.models.pretrained import config_to_yaml_dict
from visual_mllm.vision.eva_vit import EvaViTConfig
from visual_mllm.vision.image_encoder import ImageEncoderConfig
from visual_mllm.vision.qformer import QFormerConfig

from mindformers import AutoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")

# the names the earlier configs used, per class
FORMER = {
    EvaViTConfig: {"mlp_hidden_size": "intermediate_size", "layer_norm_eps": "norm_eps"},
    QFormerConfig: {"layer_norm_eps": "norm_eps"},
    GLMConfig: {"inner_hidden_size": "intermediate_size", "layernorm_epsilon": "norm_eps",
                "max_sequence_length": "max_position_embeddings"},
    LlamaConfig: {},
    QwenConfig: {},
    ImageEncoderConfig: {},
}
# values other than the defaults, under the current names
VALUES = {"intermediate_size": 96, "norm_eps": 1e-3, "max_position_embeddings": 64}


@pytest.mark.parametrize("cls", list(FORMER), ids=lambda cls: cls.__name__)
def test_every_config_has_one_naming(cls):
    keys = set(cls.own_keys())
    assert cls.all_former_keys() == FORMER[cls]
    assert not keys & set(FORMER[cls]), "a former name is still a field"
    assert set(FORMER[cls].values()) <= keys
    assert not keys & {"mlp_hidden_size", "layer_norm_eps", "inner_hidden_size", "layernorm_epsilon",
                       "max_sequence_length"}


@pytest.mark.parametrize("cls", [EvaViTConfig, QFormerConfig, GLMConfig], ids=lambda cls: cls.__name__)
def test_former_names_load_to_the_same_config(cls):
    current = cls(**{new: VALUES[new] for new in FORMER[cls].values()})
    former = cls(**{old: VALUES[new] for old, new in FORMER[cls].items()})
    assert former.to_dict() == current.to_dict()
    assert config_to_yaml_dict(former, top_level=False) == config_to_yaml_dict(current, top_level=False)
    for new in FORMER[cls].values():
        assert getattr(former, new) == VALUES[new]
    assert not set(FORMER[cls]) & set(former.to_dict()), "written out under a former name"


@pytest.mark.parametrize("cls,old", [(cls, old) for cls in (EvaViTConfig, QFormerConfig, GLMConfig)
                                     for old in FORMER[cls]])
def test_former_and_current_name_together_is_an_error(cls, old):
    new = FORMER[cls][old]
    with pytest.raises(ConflictingConfigKeyError, match=f"{old}.*{new}"):
        cls(**{old: VALUES[new], new: VALUES[new]})


def rename(section, names):
    return {names.get(key, key): value for key, value in section.items()}


def test_a_yaml_with_the_former_names_loads_to_the_same_config(tmp_path):
    with open(TINY_YAML, encoding="utf-8") as file:
        document = yaml.safe_load(file)
    model_config = document["model"]["model_config"]
    image = model_config["image_encoder_config"]
    back = {cls: {new: old for old, new in FORMER[cls].items()} for cls in FORMER}
    image["vit_config"] = rename(image["vit_config"], back[EvaViTConfig])
    image["qformer_config"] = rename(image["qformer_config"], back[QFormerConfig])
    model_config["llm_config"] = rename(model_config["llm_config"], back[GLMConfig])
    assert {"mlp_hidden_size", "inner_hidden_size", "max_sequence_length"} <= \
        set(image["vit_config"]) | set(model_config["llm_config"])
    path = tmp_path / "former.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert AutoConfig.from_pretrained(str(path)).to_dict() == AutoConfig.from_pretrained(TINY_YAML).to_dict()

    model_config["llm_config"]["norm_eps"] = 1e-5  # both spellings of one field
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(ConflictingConfigKeyError, match="layernorm_epsilon.*norm_eps"):
        AutoConfig.from_pretrained(str(path))
