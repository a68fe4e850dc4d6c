"""Does a finetuned model answer its training rows with their labels? (greedy decoding)

Used by the demo builder and the tests; also handy after a real finetune:

    model, processor = visual_mllm.load_from_yaml("configs/visualglm_tiny/run_visualglm_tiny.yaml")
    load_lora_checkpoint(model, "output/finetune_visualglm_tiny/lora.ckpt")
    report = evaluate_labels(model, processor, "examples/finetune/dataset.json")
"""
from dataclasses import dataclass
from typing import List

from .datasets import DatasetSettings, Record, read_records


@dataclass
class LabelCheck:
    record: Record
    answer: str

    @property
    def matches(self):
        return self.answer == self.record.label


def records_of(dataset, settings=None):
    settings = settings or DatasetSettings()
    _, _, records, problems, _ = read_records(settings, dataset)
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    return records


def evaluate_labels(model, processor, dataset, max_new_tokens=None, batch_size=16, use_past=None,
                    english=False) -> List[LabelCheck]:
    """Greedy answers to every row of `dataset` (a path or a list of Records), compared with the labels."""
    from ..generation.sampling import GenerationConfig
    from ..inference import ChatRequest, answer

    records = records_of(dataset) if not isinstance(dataset, list) else dataset
    if max_new_tokens is None:
        longest = max(len(processor.tokenizer.encode(r.label, add_special_tokens=False)) for r in records)
        max_new_tokens = longest + 8
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=model.config.llm_config.eos_token_id)
    checks = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        requests = [ChatRequest(prompt=r.prompt, image=r.image, history=list(r.history), english=english)
                    for r in chunk]
        results = answer(model, processor, requests, config, use_past=use_past)
        checks += [LabelCheck(r, res.response) for r, res in zip(chunk, results)]
    return checks


def describe(checks):
    good = sum(c.matches for c in checks)
    lines = [f"{good} of {len(checks)} training labels reproduced exactly"]
    for c in checks:
        mark = "ok " if c.matches else "BAD"
        lines.append(f"  {mark} row {c.record.row}: {c.record.prompt!r} -> {c.answer!r}"
                     + ("" if c.matches else f" (label {c.record.label!r})"))
    return "\n".join(lines)


__all__ = ["evaluate_labels", "LabelCheck", "describe", "records_of"]
