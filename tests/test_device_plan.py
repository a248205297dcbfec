"""The device plan: where each part of SparklesChat goes for the device asked for (8-bit decoder included)."""

from __future__ import annotations

import pytest
import torch

from sparkles.models.placement import DECODER_DEVICE_MAP, PARTS, device_plan
from sparkles.models.sparkleschat import SparklesChatConfig
from sparkles.testing.tiny import build_tiny_model


def _cfg(**kw) -> SparklesChatConfig:
    return SparklesChatConfig(llama_model="unused", **kw)


def test_8bit_on_gpu_3_puts_every_part_and_the_decoder_there():
    plan = device_plan(_cfg(low_resource=True), "cuda:3")
    assert {part: plan[part] for part in PARTS} == {part: torch.device("cuda", 3) for part in PARTS}
    assert plan[DECODER_DEVICE_MAP] == {"": 3}


def test_8bit_device_8bit_agreeing_with_the_device_is_accepted():
    plan = device_plan(_cfg(low_resource=True, device_8bit=3), torch.device("cuda", 3))
    assert plan[DECODER_DEVICE_MAP] == {"": 3} and plan["visual_encoder"] == torch.device("cuda", 3)


def test_8bit_device_8bit_naming_another_gpu_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"model\.device_8bit=1 .*cuda:3"):
        device_plan(_cfg(low_resource=True, device_8bit=1), "cuda:3")


def test_8bit_on_plain_cuda_uses_device_8bit_else_gpu_0_for_every_part():
    plan = device_plan(_cfg(low_resource=True, device_8bit=2), "cuda")
    assert plan[DECODER_DEVICE_MAP] == {"": 2}
    assert all(plan[part] == torch.device("cuda", 2) for part in PARTS)
    plan = device_plan(_cfg(low_resource=True), "cuda")
    assert plan[DECODER_DEVICE_MAP] == {"": 0} and plan["llama_proj"] == torch.device("cuda", 0)


def test_cpu_puts_every_part_on_the_cpu_and_loads_no_8bit_decoder():
    plan = device_plan(_cfg(), "cpu")
    assert all(plan[part] == torch.device("cpu") for part in PARTS)
    assert plan[DECODER_DEVICE_MAP] is None


def test_8bit_needs_cuda():
    with pytest.raises(ValueError, match="model.low_resource=True .* needs a CUDA device"):
        device_plan(_cfg(low_resource=True), "cpu")


def test_the_plan_names_every_part_of_a_model_with_all_options(tmp_path):
    """Every child module and own parameter of a model with every optional part has a place in the plan, and
    applying a plan puts each of them there (the meta device stands in for another device)."""
    model = build_tiny_model(tmp_path, qformer_text_input=True, image_ordinal_embeddings=2)
    parts = {name for name, _ in model.named_children()} | {name for name, _ in model.named_parameters(recurse=False)}
    assert parts <= set(PARTS)
    model.apply_plan(device_plan(model.cfg, "meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_plan_without_a_part_of_the_model_is_refused(tmp_path):
    model = build_tiny_model(tmp_path)
    plan = device_plan(model.cfg, "cpu")
    del plan["llama_proj"]
    with pytest.raises(KeyError, match="llama_proj"):
        model.apply_plan(plan)


def test_from_config_on_the_cpu_places_every_part_there(tmp_path):
    model = build_tiny_model(tmp_path, image_ordinal_embeddings=2)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
