"""save_pretrained / from_pretrained for visual_mllm models: a folder with `<name>.yaml` + `<name>.ckpt`.

The folder has the layout mindformers' own `from_pretrained` / `AutoModel.from_pretrained(folder)` read
(one run YAML with model.model_config / model.arch, one MindSpore checkpoint). It differs from
mindformers' `PreTrainedModel.save_pretrained` in three ways:

* the YAML holds only the keys our StrictConfigs define (nested configs included), so reading it back
  cannot trip over generic mindformers fields, and the live config is not modified while saving
  (mindformers' version strips None-valued and non-scalar attributes from nested configs in place);
* the checkpoint keys of the source (split vit/qformer/llm files or checkpoint_name_or_path) are not
  copied: the folder's own `.ckpt` holds every weight and is what loading uses;
* both files are written atomically, and loading names the file it misses.
"""
import os

import yaml
import mindspore as ms
from mindformers.models.build_config import build_model_config
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

from ..atomic import write_atomic
from ..configuration import StrictConfig

DEFAULT_SAVE_NAME = "mindspore_model"
# keys of the source's weights, replaced by the folder's own checkpoint
CHECKPOINT_KEYS = ("checkpoint_name_or_path", "vit_checkpoint", "qformer_checkpoint", "llm_checkpoint")


def config_to_yaml_dict(config, top_level=True):
    """The keys a StrictConfig defines (recursively), as plain YAML-able values; `type` on the top level."""
    if not isinstance(config, StrictConfig):
        raise TypeError(f"expected a visual_mllm StrictConfig, got {type(config).__name__}")
    out = {"type": type(config).__name__} if top_level else {}
    for key in config.own_keys():
        value = getattr(config, key)
        if isinstance(value, StrictConfig):
            value = config_to_yaml_dict(value, top_level=False)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _paths(directory, save_name):
    return os.path.join(directory, save_name + ".yaml"), os.path.join(directory, save_name + ".ckpt")


class PretrainedIOMixin:
    """Put before mindformers' PreTrainedModel in the bases of a model whose config is a StrictConfig."""

    def save_pretrained(self, save_directory, save_name=DEFAULT_SAVE_NAME, **kwargs):
        """Write `<save_directory>/<save_name>.yaml` (model section of a run YAML) and `.ckpt` (all weights).

        Returns (yaml_path, ckpt_path).
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}.save_pretrained got unsupported arguments {sorted(kwargs)} "
                            "(only the YAML + .ckpt layout is written)")
        if not isinstance(save_directory, (str, os.PathLike)) or not isinstance(save_name, str):
            raise TypeError("save_directory must be a path and save_name a str")
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        yaml_path, ckpt_path = _paths(save_directory, save_name)
        model_config = config_to_yaml_dict(self.config)
        for key in CHECKPOINT_KEYS:
            if key in model_config:
                model_config[key] = None
        document = {"model": {"model_config": model_config, "arch": {"type": type(self).__name__}}}
        params = [{"name": p.name, "data": p} for p in self.get_parameters()]
        # MindSpore appends ".ckpt" to a name without it: keep the suffix on the temporary name
        write_atomic(ckpt_path, lambda tmp: ms.save_checkpoint(params, tmp))

        def write_yaml(tmp):
            with open(tmp, "w", encoding="utf-8") as file:
                file.write(f"# {type(self).__name__} saved by save_pretrained; weights: {save_name}.ckpt\n")
                yaml.safe_dump(document, file, sort_keys=False, allow_unicode=True)
        write_atomic(yaml_path, write_yaml)
        return yaml_path, ckpt_path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, save_name=DEFAULT_SAVE_NAME, **overrides):
        """Rebuild a model written by `save_pretrained`; `overrides` replace model_config keys (e.g. use_past).

        The folder's `<save_name>.ckpt` is loaded strictly (every parameter, exact shapes).
        """
        directory = os.fspath(pretrained_model_name_or_dir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: not a directory: {directory}")
        yaml_path, ckpt_path = _paths(directory, save_name)
        for path in (yaml_path, ckpt_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {path} not found "
                                        f"(a save_pretrained folder holds {save_name}.yaml and {save_name}.ckpt)")
        document = MindFormerConfig(yaml_path)
        arch = document.model.arch.type if document.model and document.model.arch else None
        model_cls = cls if arch == cls.__name__ else _registered_model(arch)
        if model_cls is None or not issubclass(model_cls, cls):
            raise ValueError(f"{yaml_path}: model.arch.type is {arch!r}, not a {cls.__name__}")
        model_config = document.model.model_config
        for key in CHECKPOINT_KEYS:
            model_config[key] = None
        model_config.update(overrides)
        model_config["checkpoint_name_or_path"] = ckpt_path
        return model_cls(build_model_config(model_config))


def _registered_model(arch):
    """The model class registered under `arch`, or None."""
    try:
        return MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch)
    except ValueError:
        return None
