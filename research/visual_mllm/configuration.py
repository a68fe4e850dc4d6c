"""Base class of every visual_mllm config: a mindformers PretrainedConfig that refuses unknown keys.

mindformers' own PretrainedConfig silently stores any key it is given, so a typo in a YAML file
(`num_layer: 2`) would build a model of the default size without a word. Our configs accept only
their own fields, the generic fields mindformers itself writes, and `type` (the registry name).

Former field names: a config class may list, in `former_keys`, the names its fields had before a rename
({former name: current name}); every tower config names the MLP width `intermediate_size` and its norm
epsilon `norm_eps`, and YAML files written before that still say e.g. `mlp_hidden_size`. A former name
given on construction (keyword, YAML or JSON dict) is read as the current one; giving both is an error
(`ConflictingConfigKeyError`). Configs are always written out under the current names.
"""
import functools
import inspect

from mindformers.models.configuration_utils import PretrainedConfig

from .dtypes import AUTO, DTYPE_NAMES, QUANTIZE_NAMES


class UnknownConfigKeyError(ValueError):
    """A config was given a key it does not define."""


class ConflictingConfigKeyError(ValueError):
    """A config was given a field under both its former and its current name."""


def _generic_keys():
    return set(PretrainedConfig().to_dict()) | {"type", "name_or_path", "_commit_hash", "transformers_version"}


GENERIC_KEYS = frozenset(_generic_keys())


class StrictConfig(PretrainedConfig):
    """Subclasses set their fields in __init__ and then call super().__init__(**kwargs)."""

    model_type = "visual_mllm"
    # {former field name: current field name} of this class, read on construction (see the module
    # docstring); a subclass adds its own, those of its bases still apply
    former_keys = {}

    def __init_subclass__(cls, **kwargs):
        # every subclass __init__ gets its keyword arguments with the former names already translated
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            init(self, *args, **type(self).translate_former_keys(kw))

        cls.__init__ = __init__

    @classmethod
    def all_former_keys(cls):
        """{former name: current name} of this class and its bases."""
        out = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("former_keys", {}))
        return out

    @classmethod
    def translate_former_keys(cls, kwargs):
        """kwargs with every former field name replaced by the current one (a new dict)."""
        renames = cls.all_former_keys()
        out = dict(kwargs)
        for former, current in renames.items():
            if former not in out:
                continue
            if current in out:
                raise ConflictingConfigKeyError(
                    f"{cls.__name__}: both {former!r} (the former name) and {current!r} are given; "
                    f"keep only {current!r}")
            out[current] = out.pop(former)
        return out

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
        """The fields of this class and of its StrictConfig bases."""
        keys = []
        for klass in cls.__mro__:
            if issubclass(klass, StrictConfig) and klass is not StrictConfig and "__init__" in vars(klass):
                code = inspect.unwrap(vars(klass)["__init__"]).__code__
                keys += [name for name in code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount]
                         if name not in keys]
        return keys

    @staticmethod
    def sub_config(value, config_cls):
        """Accept a nested config as an instance, a dict (from YAML/JSON) or None (the defaults)."""
        if isinstance(value, config_cls):
            return value
        if value is None:
            return config_cls()
        return config_cls(**dict(value))



class TowerConfig(StrictConfig):
    """A tower's config (ViT, Q-Former, LLM): its sizes (the subclass's fields) and its precision.

    param_dtype: the dtype its Linear and Embedding weights are held in (float32 | float16 | bfloat16);
        the converter writes the dtype it wrote, `run_infer.py --dtype` overrides it. Half precision
        halves the weights' memory; norms, softmax, rotary and the logits stay float32 whatever it is.
    compute_dtype: the dtype of its matmuls and activations (float32 | float16 | bfloat16 | auto =
        float16 on Ascend, float32 elsewhere). MindSpore's CPU has no bfloat16 matmul and only a slow
        float16 one: there, half precision is a storage format (param_dtype) and compute stays float32.
    quantize: null, or int8: weight-only int8 for the tower's Linear layers (the LLM's lm_head, embeddings
        and norms excepted): a quarter of float32's memory; float checkpoints are quantised as they load.
    """

    def __init__(self, param_dtype="float32", compute_dtype="float32", quantize=None, **kwargs):
        for key, value, allowed in (("param_dtype", param_dtype, DTYPE_NAMES),
                                    ("compute_dtype", compute_dtype, DTYPE_NAMES + (AUTO,)),
                                    ("quantize", quantize, QUANTIZE_NAMES)):
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}: {key} {value!r} is not one of "
                                 f"{', '.join(str(v) for v in allowed)}")
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.quantize = quantize
        super().__init__(**kwargs)
