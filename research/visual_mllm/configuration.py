"""Base class of every visual_mllm config: a mindformers PretrainedConfig that refuses unknown keys.

mindformers' own PretrainedConfig silently stores any key it is given, so a typo in a YAML file
(`num_layer: 2`) would build a model of the default size without a word. Our configs accept only
their own fields, the generic fields mindformers itself writes, and `type` (the registry name).
"""
from mindformers.models.configuration_utils import PretrainedConfig


class UnknownConfigKeyError(ValueError):
    """A config was given a key it does not define."""


def _generic_keys():
    return set(PretrainedConfig().to_dict()) | {"type", "name_or_path", "_commit_hash", "transformers_version"}


GENERIC_KEYS = frozenset(_generic_keys())


class StrictConfig(PretrainedConfig):
    """Subclasses set their fields in __init__ and then call super().__init__(**kwargs)."""

    model_type = "visual_mllm"

    def __init__(self, **kwargs):
        kwargs.pop("type", None)
        if isinstance(kwargs.get("parallel_config"), dict):
            # to_dict() writes mindformers' parallel settings out as a dict; our models run data
            # parallel only and never read them, so a dict read back is dropped for the default.
            kwargs.pop("parallel_config")
        unknown = sorted(set(kwargs) - GENERIC_KEYS)
        if unknown:
            raise UnknownConfigKeyError(
                f"{type(self).__name__}: unknown config key(s) {unknown}; "
                f"known keys are {sorted(self.own_keys())}")
        super().__init__(**kwargs)

    @classmethod
    def own_keys(cls):
        code = cls.__init__.__code__
        return [name for name in code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount]]

    @staticmethod
    def sub_config(value, config_cls):
        """Accept a nested config as an instance, a dict (from YAML/JSON) or None (the defaults)."""
        if isinstance(value, config_cls):
            return value
        if value is None:
            return config_cls()
        return config_cls(**dict(value))
