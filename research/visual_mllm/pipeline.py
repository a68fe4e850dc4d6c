"""The mindformers pipeline task of visual_mllm: image (optional) + prompt + history -> answer.

`import visual_mllm` registers `ImageToTextChatPipeline` with MindFormerRegister (PIPELINE) under the
task name TASK and adds TASK to MindFormerBook's pipeline task table, which `mindformers.pipeline`
checks. Then:

    pipe = mindformers.pipeline(task="image_to_text_generation", model=model, processor=processor,
                                tokenizer=processor.tokenizer, image_processor=processor.image_processor)
    results = pipe([{"image": "cat.png", "prompt": "描述这张图片。"}, ...], batch_size=4,
                   max_new_tokens=64, do_sample=False)

Inputs are ChatRequests or dicts with the fields of a JSONL request (`request_file.py`); a list gives
a list of ChatResults, one input gives one ChatResult. The steps are those of `inference.answer`.
"""
from collections import OrderedDict

from mindformers.mindformer_book import MindFormerBook
from mindformers.pipeline.base_pipeline import Pipeline
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .generation.sampling import GenerationConfig
from .inference import ChatRequest, finish_batch, generate_batch, prepare_batch
from .paths import DEFAULT_CONFIG
from .request_file import request_from_fields

TASK = "image_to_text_generation"
# mindformers.pipeline() reads the YAML of the table entry "common" when it is given a model instance
# (it builds a tokenizer / image processor from it only if none is passed): the built-in demo model's.
TASK_CONFIG = DEFAULT_CONFIG


class ImageToTextChatPipeline(Pipeline):
    """Chat answers of a visual_mllm model through the mindformers Pipeline interface.

    Args:
        model: a visual_mllm VisionLanguageModel.
        processor: its processor (prompt builder + image processor + tokenizer), bound to the model.
        Call keywords: `generation_config` (a GenerationConfig) or its fields (max_new_tokens,
        do_sample, top_k, ...; default greedy with the model's end token), `use_past`, `stream`
        (print row 0's answer as it is generated).
    """

    def __init__(self, model, processor=None, **kwargs):
        if processor is None:
            raise ValueError(f"the {TASK} pipeline needs processor= (the model's processor, e.g. from "
                             "visual_mllm.load_from_yaml)")
        if kwargs.pop("audio_processor", None) is not None:  # mindformers.pipeline passes audio_processor=None
            raise ValueError(f"the {TASK} pipeline takes no audio_processor")
        self.processor = processor
        kwargs.setdefault("tokenizer", processor.tokenizer)
        kwargs.setdefault("image_processor", processor.image_processor)
        super().__init__(model, **kwargs)

    def _sanitize_parameters(self, generation_config=None, use_past=None, stream=False, batch_size=None,
                             **generation_kwargs):
        unknown = sorted(set(generation_kwargs) - set(GenerationConfig.field_names()))
        if unknown:
            raise ValueError(f"{TASK} pipeline: unknown argument(s) {', '.join(unknown)}")
        preprocess, forward = {}, {}
        if generation_config is not None or generation_kwargs:
            if generation_config is None:
                generation_kwargs.setdefault("eos_token_id", self.network.config.llm_config.eos_token_id)
                generation_config = GenerationConfig(**generation_kwargs)
            elif generation_kwargs:
                raise ValueError(f"{TASK} pipeline: give generation_config or its fields, not both")
            forward["generation_config"] = generation_config
            preprocess["max_new_tokens"] = generation_config.max_new_tokens  # the history budget
        if use_past is not None:
            forward["use_past"] = use_past
        if stream:
            forward["stream"] = stream
        return preprocess, forward, {}

    @staticmethod
    def _as_request(item):
        return item if isinstance(item, ChatRequest) else request_from_fields(item)

    def preprocess(self, inputs, max_new_tokens=None, **preprocess_params):
        single = not isinstance(inputs, (list, tuple))
        requests = [self._as_request(item) for item in ([inputs] if single else inputs)]
        if max_new_tokens is None:
            max_new_tokens = self._default_generation_config().max_new_tokens
        return {"batch": prepare_batch(self.network, self.processor, requests, max_new_tokens), "single": single}

    def _default_generation_config(self):
        return GenerationConfig(eos_token_id=self.network.config.llm_config.eos_token_id)

    def run_multi(self, inputs, batch_size, preprocess_params, forward_params, postprocess_params):
        """Batches of `batch_size` in input order; the last batch may be smaller."""
        outputs = []
        for start in range(0, len(inputs), batch_size):
            outputs.extend(self.run_single(list(inputs[start:start + batch_size]), preprocess_params,
                                           forward_params, postprocess_params))
        return outputs

    def _forward(self, model_inputs, generation_config=None, use_past=None, stream=False):
        config = generation_config or self._default_generation_config()
        generated, timings = generate_batch(self.network, self.processor, model_inputs["batch"], config,
                                            stream=stream, use_past=use_past)
        return dict(model_inputs, generated=generated, timings=timings)

    def postprocess(self, model_outputs, **postprocess_params):
        results = finish_batch(self.processor, model_outputs["batch"], model_outputs["generated"],
                               model_outputs["timings"])
        return results[0] if model_outputs["single"] else results


def register_task():
    """Make TASK known to mindformers.pipeline (idempotent)."""
    MindFormerRegister.register_cls(ImageToTextChatPipeline, MindFormerModuleType.PIPELINE, alias=TASK)
    MindFormerBook.get_pipeline_support_task_list()[TASK] = OrderedDict([("common", TASK_CONFIG)])


__all__ = ["TASK", "ImageToTextChatPipeline", "register_task"]
