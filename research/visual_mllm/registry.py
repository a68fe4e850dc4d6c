"""Everything mindformers needs to build visual_mllm classes from a run YAML; imported by `import visual_mllm`.

After the import these routes all give our classes:

* ``MindFormerConfig(yaml)`` + ``build_model(config.model)`` / ``build_processor(config.processor)``;
* ``AutoConfig.from_pretrained(yaml)``, ``AutoModel.from_config(yaml)``, ``AutoModel.from_config(config)``,
  ``AutoProcessor.from_pretrained(yaml)``;
* ``load_from_yaml(yaml, **overrides) -> (model, processor)``: the one call the scripts use.

Registration (idempotent):

* MindFormerRegister CONFIG: every family's composite config and decoder config (see ``families.py``)
  and the image-side configs ImageEncoderConfig, EvaViTConfig, QFormerConfig; MODELS: every family's
  model; PROCESSOR: VisionLanguageProcessor, VisualGLMProcessor, BlipImageProcessor; TOKENIZER: every
  family's tokenizer; PIPELINE: the ``image_to_text_generation`` task (``pipeline.py``), also added to
  MindFormerBook's pipeline task table.
* AutoConfig by ``model_type`` for every config; AutoModel and AutoProcessor for every family's config.

Tokenizer: ``vocab_file: null`` is ChatGLMTokenizer's own default, the tiny tokenizer shipped in
``visual_mllm/assets`` (PACKAGED_VOCAB_FILE). The key itself must be present: mindformers' build_tokenizer
refuses a tokenizer section without ``vocab_file``. For a real ice_text.model also set
``num_image_tokens: 0`` (the published tokenizer_config.json value; the class default is 20000).

Unknown keys: every config is a ``StrictConfig``; an unknown key anywhere in ``model_config`` (nested
configs included) raises ``UnknownConfigKeyError`` naming it, through every route above. Field names a
config class has renamed (its ``former_keys``, e.g. ``mlp_hidden_size`` -> ``intermediate_size``) are
still read, as the current ones; giving both raises ``ConflictingConfigKeyError``.
"""
import copy
import os

from mindformers.models.auto import AutoConfig, AutoModel, AutoProcessor
from mindformers.models.build_config import build_model_config
from mindformers.models.build_model import build_model
from mindformers.models.build_processor import build_processor
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

from .families import FAMILIES
from .models.processor import VisionLanguageProcessor, VisualGLMProcessor
from .pipeline import register_task as register_pipeline_task
from .processing.image import BlipImageProcessor
from .tokenizers.chatglm import PACKAGED_VOCAB_FILE
from .vision.cogvlm_image import CogVLMImageEncoderConfig
from .vision.eva_vit import Eva2ClipConfig, EvaViTConfig
from .vision.image_encoder import ImageEncoderConfig
from .vision.qformer import QFormerConfig

CONFIG_CLASSES = tuple(dict.fromkeys(
    [cls for f in FAMILIES for cls in (f.config_class, f.config_class.llm_config_class)]
    + [f.config_class.image_encoder_config_class for f in FAMILIES]
    + [ImageEncoderConfig, EvaViTConfig, QFormerConfig, CogVLMImageEncoderConfig, Eva2ClipConfig]))


def processor_class(family):
    """The processor class a family's run YAML names (VisualGLM keeps its seed-era name)."""
    return VisualGLMProcessor if family.name == "visualglm" else VisionLanguageProcessor


# --- registration ------------------------------------------------------------------------------------
def _register(module_type, cls):
    MindFormerRegister.register_cls(cls, module_type=module_type)


def register_all():
    """Register every class with MindFormerRegister and the Auto classes (safe to call again)."""
    for cls in CONFIG_CLASSES:
        _register(MindFormerModuleType.CONFIG, cls)
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
    for family in FAMILIES:
        _register(MindFormerModuleType.MODELS, family.model_class)
        _register(MindFormerModuleType.TOKENIZER, family.tokenizer_class)
        AutoModel.register(family.config_class, family.model_class, exist_ok=True)
        AutoProcessor.register(family.config_class, processor_class(family), exist_ok=True)
    for cls in (VisionLanguageProcessor, VisualGLMProcessor, BlipImageProcessor):
        _register(MindFormerModuleType.PROCESSOR, cls)
    register_pipeline_task()


register_all()


# --- loading -----------------------------------------------------------------------------------------
def merge_dicts(base, overrides):
    """Deep-merge `overrides` into the dict `base` (dict values merge into dict values)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_dicts(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def plain(value):
    """MindFormerConfig (nested) -> plain dicts."""
    if isinstance(value, dict):
        return {key: plain(val) for key, val in value.items()}
    if isinstance(value, list):
        return [plain(val) for val in value]
    return value


def read_run_config(yaml_path, model_overrides=None, processor_overrides=None):
    """The run YAML as a MindFormerConfig with overrides merged into model.model_config / processor."""
    yaml_path = os.fspath(yaml_path)
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"run config not found: {yaml_path}")
    config = MindFormerConfig(os.path.realpath(yaml_path))
    if config.model is None or config.model.model_config is None or config.model.arch is None:
        raise ValueError(f"{yaml_path}: needs model.model_config and model.arch sections")
    if config.get("use_legacy", True) is False:
        raise ValueError(f"{yaml_path}: use_legacy: False is not supported by visual_mllm models")
    if model_overrides:
        model_overrides = image_tower_overrides(config.model.model_config.get("type"), model_overrides)
        merged = merge_dicts(plain(config.model.model_config), model_overrides)
        config.model.model_config = MindFormerConfig(**merged)
    if processor_overrides:
        if config.processor is None:
            raise ValueError(f"{yaml_path}: has no processor section to override")
        merged = merge_dicts(plain(config.processor), processor_overrides)
        config.processor = MindFormerConfig(**merged)
    return config


EVERY_IMAGE_TOWER = "every_tower"  # model_overrides["image_encoder_config"] key: applies to each image-side tower


def image_tower_overrides(config_type, model_overrides):
    """`model_overrides` with an `EVERY_IMAGE_TOWER` entry of image_encoder_config given to each tower of the
    YAML's image side (BLIP-2: vit_config and qformer_config; CogVLM: vit_config)."""
    image = model_overrides.get("image_encoder_config")
    if not isinstance(image, dict) or EVERY_IMAGE_TOWER not in image:
        return model_overrides
    family = next((f for f in FAMILIES if f.config_class.__name__ == config_type), None)
    if family is None:
        raise ValueError(f"model_config type {config_type!r} is not the config of a known model family")
    image = dict(image)
    tower = image.pop(EVERY_IMAGE_TOWER)
    for key in family.config_class.image_encoder_config_class().towers():
        image[key] = merge_dicts(dict(tower), image.get(key, {}))
    return dict(model_overrides, image_encoder_config=image)


def precision_overrides(param_dtype=None, compute_dtype=None, quantize=None):
    """model_overrides giving every tower (the image side's, the LLM) these dtypes and the LLM's Linear layers
    `quantize` ("int8", or "none" for float); None keeps the YAML's."""
    tower = {key: value for key, value in (("param_dtype", param_dtype), ("compute_dtype", compute_dtype)) if value}
    llm = dict(tower)
    if quantize:
        llm["quantize"] = None if quantize == "none" else quantize
    overrides = {"image_encoder_config": {EVERY_IMAGE_TOWER: tower}} if tower else {}
    return {**overrides, "llm_config": llm} if llm else overrides


def load_from_yaml(yaml_path, processor_overrides=None, **model_overrides):
    """Build (model, processor) from a run YAML through the mindformers registry.

    model_overrides: keys of model.model_config to replace, e.g. ``seq_length=256, use_past=False,
        llm_checkpoint="..."``; a dict value merges into a nested config
        (``llm_config={"num_layers": 2}``). Unknown keys raise UnknownConfigKeyError.
    processor_overrides: dict merged into the processor section, e.g.
        ``{"tokenizer": {"vocab_file": "/path/ice_text.model"}}``.

    The processor is bound to the model config (image token count, placeholder id, special ids,
    image size), so the pair is consistent or this raises.
    """
    config = read_run_config(yaml_path, model_overrides, processor_overrides)
    if config.processor is None:
        raise ValueError(f"{yaml_path}: has no processor section")
    model_config = build_model_config(config.model.model_config)
    processor = build_processor(config.processor)  # before the model: its errors come without waiting for weights
    processor.configure_for_model(model_config)
    config.model.model_config = model_config  # build_model takes a config instance as it is
    model = build_model(config.model)
    return model, processor


def load_processor_from_yaml(yaml_path, processor_overrides=None, **model_overrides):
    """Only the processor, bound to the YAML's model config (no weights are built or read)."""
    config = read_run_config(yaml_path, model_overrides, processor_overrides)
    if config.processor is None:
        raise ValueError(f"{yaml_path}: has no processor section")
    processor = build_processor(config.processor)
    processor.configure_for_model(build_model_config(config.model.model_config))
    return processor


__all__ = ["load_from_yaml", "load_processor_from_yaml", "read_run_config", "register_all", "PACKAGED_VOCAB_FILE"]
