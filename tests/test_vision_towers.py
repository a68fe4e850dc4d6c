"""The image side (EVA ViT, ln_vision, Q-Former, projection) against the SAT VisualGLM references and
against transformers' Blip2VisionModel / Blip2QFormerModel.

Sizes and samples come from the fixture files (SAT model_config.json, reference.json, the full-size
shape table), never from literals.
"""
import json

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore.nn.utils import no_init_parameters

from conftest import fixture_path, load_json, npz_prefix
from visual_mllm.convert.engine import converted_tensors
from visual_mllm.convert.keymap import plan
from visual_mllm.convert.readers import Source, SourceTensor
from visual_mllm.convert.visualglm_sat import image_encoder_config_from_sat, image_side_rules, read_source
from visual_mllm.vision.image_encoder import ImageEncoder, ImageEncoderConfig

PREFIX = "image_encoder."  # our names inside the composite model; ImageEncoder alone has none
SAT_IMAGE_SIDE = "mixins.eva."
SAT_TOLERANCE = 1e-4
HF_TOLERANCE = 1e-5


def sat_config():
    return image_encoder_config_from_sat(load_json("visualglm", "sat", "visualglm-tiny", "model_config.json"))


def image_side(source):
    """The image-side keys of a SAT Source."""
    return Source({key: value for key, value in source.items() if key.startswith(SAT_IMAGE_SIDE)},
                  source.files, source.description)


def parameter_shapes(encoder):
    return {PREFIX + name: tuple(p.shape) for name, p in encoder.parameters_and_names()}


def strip_prefix(arrays):
    assert all(key.startswith(PREFIX) for key in arrays)
    return {key[len(PREFIX):]: value for key, value in arrays.items()}


def load_arrays(cell, arrays, leave_out=()):
    """Set every parameter of `cell` (except names starting with `leave_out`) from `arrays`, exactly."""
    params = {name: p for name, p in cell.parameters_and_names() if not name.startswith(tuple(leave_out))}
    assert sorted(arrays) == sorted(params)
    for name, param in params.items():
        assert tuple(param.shape) == arrays[name].shape, name
        param.set_data(ms.Tensor(np.ascontiguousarray(arrays[name], dtype=np.float32)))


def image_samples():
    """(npz prefix, sample) for every reference sample that has an image; skips the test if there is none."""
    samples = load_json("visualglm", "reference.json")["samples"]
    found = [(npz_prefix(sample), sample) for sample in samples if sample["image"] is not None]
    if not found:
        pytest.skip("the VisualGLM fixture has no sample with an image (no reference pixel values)")
    return found


def sat_encoder(folder="visualglm-tiny"):
    config = sat_config()
    encoder = ImageEncoder(config)
    source = image_side(read_source(str(fixture_path("visualglm", "sat", folder))))
    the_plan = plan(source, image_side_rules(config), (), parameter_shapes(encoder), folder)
    load_arrays(encoder, strip_prefix({name: t.float().numpy() for name, t in converted_tensors(the_plan, None)}))
    return encoder


def batched_pixels(reference):
    return np.concatenate([reference[f"{prefix}_pixel_values"] for prefix, _ in image_samples()])


def encode(encoder, pixel_values):
    return [t.asnumpy() for t in encoder.encode_with_intermediates(ms.Tensor(pixel_values))]


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----- SAT key map -----

def test_sat_key_map_uses_every_image_side_key_and_fills_every_parameter():
    config = sat_config()
    source = read_source(str(fixture_path("visualglm", "sat", "visualglm-tiny")))
    rules = image_side_rules(config)
    sources = {key for rule in rules for key in rule.sources}
    targets = [target for rule in rules for target in rule.targets]
    assert sources == set(image_side(source))
    assert len(targets) == len(set(targets))
    assert sorted(targets) == sorted(parameter_shapes(ImageEncoder(config)))


def test_full_size_shapes_match_the_release_table():
    """Default configs = the real EVA ViT-g / Q-Former: every mapped SAT shape lands on our shape."""
    path = str(fixture_path("shapes", "visualglm_full_shapes.tsv"))
    shapes = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            shapes[key] = SourceTensor(path, tuple(json.loads(shape)), getattr(torch, dtype), None)
    config = ImageEncoderConfig(projection_size=shapes["mixins.eva.model.glm_proj.weight"].shape[0])
    with no_init_parameters():  # shapes only: no 1 B random numbers
        encoder = ImageEncoder(config)
    ours = parameter_shapes(encoder)
    the_plan = plan(image_side(Source(shapes, [path], path)), image_side_rules(config), (), ours, path)
    assert {name: tuple(meta.shape) for name, meta in the_plan.targets.items()} == ours


# ----- SAT references -----

@pytest.mark.parametrize("folder, npz", [("visualglm-tiny", "reference.npz"),
                                         ("visualglm-tiny-fp16", "reference_fp16_weights.npz")])
def test_image_side_matches_sat_reference(folder, npz):
    reference = np.load(fixture_path("visualglm", npz))
    samples = image_samples()
    vit_out, qformer_out, image_embeds = encode(sat_encoder(folder), batched_pixels(reference))
    for row, (prefix, sample) in enumerate(samples):
        for name, ours in (("vit_out", vit_out), ("qformer_out", qformer_out), ("image_embeds", image_embeds)):
            diff = max_diff(ours[row], reference[f"{prefix}_{name}"])
            assert diff < SAT_TOLERANCE, f"{sample['name']} {name}: max |diff| {diff}"


def test_graph_mode_matches_pynative():
    encoder = sat_encoder()
    pixel_values = ms.Tensor(batched_pixels(np.load(fixture_path("visualglm", "reference.npz"))))
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        pynative = encoder(pixel_values).asnumpy()
        ms.set_context(mode=ms.GRAPH_MODE)
        graph = encoder(pixel_values).asnumpy()
    finally:
        ms.set_context(mode=previous_mode)
    assert graph.shape == pynative.shape
    assert max_diff(graph, pynative) < HF_TOLERANCE


# ----- transformers Blip2 -----

def hf_vision_map(config):
    """Our name (inside ImageEncoder) -> Blip2VisionModel state-dict name."""
    names = {
        "vit.cls_token": "embeddings.class_embedding",
        "vit.pos_embed": "embeddings.position_embedding",
        "ln_vision.{p}": "post_layernorm.{p}",
        "vit.patch_embed.{p}": "embeddings.patch_embedding.{p}",
    }
    for i in range(config.vit_config.num_layers):
        names.update({
            f"vit.blocks.{i}.norm1.{{p}}": f"encoder.layers.{i}.layer_norm1.{{p}}",
            f"vit.blocks.{i}.attn.qkv.{{p}}": f"encoder.layers.{i}.self_attn.qkv.{{p}}",
            f"vit.blocks.{i}.attn.proj.{{p}}": f"encoder.layers.{i}.self_attn.projection.{{p}}",
            f"vit.blocks.{i}.norm2.{{p}}": f"encoder.layers.{i}.layer_norm2.{{p}}",
            f"vit.blocks.{i}.mlp.fc1.{{p}}": f"encoder.layers.{i}.mlp.fc1.{{p}}",
            f"vit.blocks.{i}.mlp.fc2.{{p}}": f"encoder.layers.{i}.mlp.fc2.{{p}}",
        })
    return expand_weight_bias(names)


def hf_qformer_map(config):
    """Our name (inside ImageEncoder) -> Blip2QFormerModel state-dict name (query_tokens live in Blip2Model)."""
    names = {"qformer.layernorm.{p}": "layernorm.{p}"}
    for i in range(config.qformer_config.num_layers):
        ours, hf = f"qformer.layers.{i}.", f"encoder.layer.{i}."
        names.update({
            ours + "self_attn.query.{p}": hf + "attention.attention.query.{p}",
            ours + "self_attn.key.{p}": hf + "attention.attention.key.{p}",
            ours + "self_attn.value.{p}": hf + "attention.attention.value.{p}",
            ours + "self_attn.dense.{p}": hf + "attention.output.dense.{p}",
            ours + "self_attn_norm.{p}": hf + "attention.output.LayerNorm.{p}",
            ours + "mlp.fc1.{p}": hf + "intermediate_query.dense.{p}",
            ours + "mlp.fc2.{p}": hf + "output_query.dense.{p}",
            ours + "mlp_norm.{p}": hf + "output_query.LayerNorm.{p}",
        })
        if config.qformer_config.has_cross_attention(i):
            names.update({
                ours + "cross_attn.query.{p}": hf + "crossattention.attention.query.{p}",
                ours + "cross_attn.key.{p}": hf + "crossattention.attention.key.{p}",
                ours + "cross_attn.value.{p}": hf + "crossattention.attention.value.{p}",
                ours + "cross_attn.dense.{p}": hf + "crossattention.output.dense.{p}",
                ours + "cross_attn_norm.{p}": hf + "crossattention.output.LayerNorm.{p}",
            })
    return expand_weight_bias(names)


def expand_weight_bias(names):
    out = {}
    for ours, hf in names.items():
        for p in ("weight", "bias") if "{p}" in ours else (None,):
            out[ours.format(p=p)] = hf.format(p=p)
    return out


def randomise(model, generator):
    """HF's default init (std 0.02 / 1e-10) makes every token nearly the same; use informative weights."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embedding"):  # CLS / position embeddings
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif param.ndim == 1:  # biases, LayerNorm weights and biases
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            if "norm" in name.lower() and name.endswith("weight"):
                param.add_(1.0)


@pytest.fixture(scope="module")
def hf_blip2():
    """Tiny HF Blip2 vision model + Q-Former with the fixture's sizes, random weights, and their outputs."""
    transformers = pytest.importorskip("transformers")
    config = sat_config()
    vc, qc = config.vit_config, config.qformer_config
    generator = torch.Generator().manual_seed(0)
    vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_layers,
        num_attention_heads=vc.num_heads, image_size=vc.image_size, patch_size=vc.patch_size,
        layer_norm_eps=vc.norm_eps, qkv_bias=True, attn_implementation="eager")).eval()
    vision.post_layernorm.eps = config.ln_vision_eps  # HF reuses the block eps for post_layernorm
    qformer = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(
        hidden_size=qc.hidden_size, num_hidden_layers=qc.num_layers, num_attention_heads=qc.num_heads,
        intermediate_size=qc.intermediate_size, cross_attention_frequency=qc.cross_attention_frequency,
        encoder_hidden_size=qc.encoder_hidden_size, layer_norm_eps=qc.norm_eps,
        attn_implementation="eager")).eval()
    randomise(vision, generator)
    randomise(qformer, generator)
    query_tokens = torch.randn(1, qc.num_query_tokens, qc.hidden_size, generator=generator)
    with torch.no_grad():
        for layer in vision.encoder.layers:  # EVA has no key bias: the K third of the fused bias is 0
            layer.self_attn.qkv.bias[vc.hidden_size:2 * vc.hidden_size] = 0.0
        pixel_values = torch.from_numpy(batched_pixels(np.load(fixture_path("visualglm", "reference.npz"))))
        vit_out = vision(pixel_values=pixel_values).last_hidden_state
        qformer_out = qformer(query_embeds=query_tokens.expand(vit_out.shape[0], -1, -1),
                              encoder_hidden_states=vit_out).last_hidden_state
    vision_sd, qformer_sd = vision.state_dict(), qformer.state_dict()
    arrays = {ours: vision_sd[hf].numpy() for ours, hf in hf_vision_map(config).items()}
    arrays.update({ours: qformer_sd[hf].numpy() for ours, hf in hf_qformer_map(config).items()})
    arrays["qformer.query_tokens"] = query_tokens.numpy()
    assert vit_out.std(dim=1).mean() > 0.1 and qformer_out.std(dim=1).mean() > 0.1  # tokens differ
    return config, arrays, pixel_values.numpy(), vit_out.numpy(), qformer_out.numpy()


def run_on_hf_weights(hf_blip2, arrays):
    """Our (ViT + ln_vision output on the pixels, Q-Former output on HF's ViT output)."""
    config, _, pixel_values, hf_vit_out, _ = hf_blip2
    encoder = ImageEncoder(config)
    load_arrays(encoder, arrays, leave_out=("projection.",))
    vit_out = encoder.ln_vision(encoder.vit(ms.Tensor(pixel_values))).asnumpy()
    qformer_out = encoder.qformer(ms.Tensor(hf_vit_out)).asnumpy()
    return vit_out, qformer_out


def test_matches_transformers_blip2(hf_blip2):
    _, arrays, _, hf_vit_out, hf_qformer_out = hf_blip2
    vit_out, qformer_out = run_on_hf_weights(hf_blip2, arrays)
    assert max_diff(vit_out, hf_vit_out) < HF_TOLERANCE
    assert max_diff(qformer_out, hf_qformer_out) < HF_TOLERANCE


def swap_cross_key_value(arrays):
    layer = min(int(name.split(".")[2]) for name in arrays  # the first Q-Former layer with cross-attention
                if name.startswith("qformer.layers.") and ".cross_attn." in name)
    out = dict(arrays)
    key, value = f"qformer.layers.{layer}.cross_attn.key.weight", f"qformer.layers.{layer}.cross_attn.value.weight"
    out[key], out[value] = arrays[value], arrays[key]
    return out


def swap_vit_query_key_rows(arrays):
    out = dict(arrays)
    q, k, v = np.split(arrays["vit.blocks.0.attn.qkv.weight"], 3)
    out["vit.blocks.0.attn.qkv.weight"] = np.concatenate([k, q, v])
    return out


@pytest.mark.parametrize("corrupt, output", [(swap_cross_key_value, 1), (swap_vit_query_key_rows, 0)])
def test_transformers_comparison_detects_wrong_mapping(hf_blip2, corrupt, output):
    """Negative control: the comparison above fails when one mapping is wrong."""
    _, arrays, _, hf_vit_out, hf_qformer_out = hf_blip2
    ours = run_on_hf_weights(hf_blip2, corrupt(arrays))[output]
    assert max_diff(ours, (hf_vit_out, hf_qformer_out)[output]) > 100 * HF_TOLERANCE


@pytest.mark.parametrize("height, width", [(28, 42), (31, 45)])  # divisible, and with a remainder to drop
def test_patch_embedding_equals_the_valid_convolution(height, width):
    """PatchEmbed (one matmul over flattened patches) computes what the checkpoint's Conv2d computes:
    MindSpore's own Conv2d with kernel = stride = patch and valid padding, same weight and bias."""
    from visual_mllm.vision.eva_vit import PatchEmbed

    patch, channels, hidden = 7, 3, 16
    rng = np.random.default_rng(0)
    embed = PatchEmbed(channels, hidden, patch)
    embed.weight.set_data(ms.Tensor(rng.standard_normal(embed.weight.shape).astype(np.float32)))
    embed.bias.set_data(ms.Tensor(rng.standard_normal(embed.bias.shape).astype(np.float32)))
    conv = ms.nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch, pad_mode="valid", has_bias=True)
    conv.weight.set_data(embed.weight.value())
    conv.bias.set_data(embed.bias.value())
    pixels = ms.Tensor(rng.standard_normal((2, channels, height, width)).astype(np.float32))
    expected = conv(pixels).asnumpy()  # [B, D, H/p, W/p]
    expected = expected.reshape(2, hidden, -1).transpose(0, 2, 1)  # [B, N, D], patches row-major
    got = embed(pixels).asnumpy()
    assert got.shape == (2, (height // patch) * (width // patch), hidden)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
