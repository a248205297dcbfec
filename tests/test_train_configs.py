"""The shipped train configs: the paper recipe and the CPU tiny run load strictly and say what they should."""

from __future__ import annotations

from pathlib import Path

import pytest

import sparkles.data.builders as builders
import sparkles.models  # noqa: F401
from sparkles.common.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


@pytest.mark.parametrize("name", ["sparkleschat.yaml", "sparkleschat_tiny.yaml"])
def test_configs_train_on_the_ten_splits(name):
    cfg = load_config(CONFIGS / name)
    dialogue = [n for n in cfg.datasets if n.startswith("SparklesDialogue")]
    assert tuple(dialogue) == builders.DIALOGUE_NAMES
    ratios = {n: d.sample_ratio for n, d in cfg.datasets.items()}
    if name == "sparkleschat.yaml":  # the paper's 2/1 ratios
        assert list(cfg.datasets) == dialogue
        assert all(r == (2 if "turn1" in n else 1) for n, r in ratios.items()) and sum(ratios.values()) == 15
    else:  # the tiny world weights the two-image first turns up and keeps the warm-up's drills in the mix
        assert all(r > 0 for r in ratios.values())
        assert max(ratios, key=ratios.get).endswith("turn1_2img")
        assert cfg.model.ckpt == "models/sparkleschat_tiny_reasoning/checkpoint_last.pth"
    assert not Path(cfg.run.output_dir).is_absolute()
    for n in dialogue:
        d = cfg.datasets[n]
        assert not Path(d.root_dir).is_absolute() and d.anno_path.startswith("annotations/")


def test_tiny_stages_chain_towers_reasoning_dialogues():
    """run.sh's three stages: message-reading towers → verdict warm-up on text-only drills → dialogues →
    evaluation, each naming the world's module in run.imports."""
    stage0 = load_config(CONFIGS / "sparkleschat_tiny_towers.yaml")
    warm_up = load_config(CONFIGS / "sparkleschat_tiny_reasoning.yaml")
    dialogues = load_config(CONFIGS / "sparkleschat_tiny.yaml")
    evaluation = load_config(Path(__file__).resolve().parents[1] / "eval_configs" / "sparkles_tiny.yaml")
    towers = f"{stage0.run.output_dir}/blip2_towers.pth"
    assert stage0.model.model_type == "tiny" and stage0.run.task == "tower_pretrain"
    assert list(stage0.datasets) == ["synthetic_instruction_tags"]
    assert list(warm_up.datasets) == ["synthetic_reasoning"] and not warm_up.model.ckpt  # a fresh decoder
    assert warm_up.run.find_unused_parameters  # text only: the projection gets no gradient under torchrun
    assert dialogues.model.ckpt == f"{warm_up.run.output_dir}/checkpoint_last.pth"
    ratios = {n: d.sample_ratio for n, d in dialogues.datasets.items()}
    assert max(ratios, key=ratios.get).endswith("turn1_2img") and ratios["synthetic_perception"] > 0
    # the drills stay in the dialogue stage's mix, so text-only batches need DDP's unused-parameter search
    assert ratios["synthetic_reasoning"] > 0 and dialogues.run.find_unused_parameters
    for cfg in (warm_up, dialogues, evaluation):
        assert cfg.model.model_type == "tiny" and cfg.model.q_former_model == towers
    for cfg in (warm_up, dialogues):
        assert cfg.model.freeze_vit and cfg.model.freeze_qformer
    for cfg in (stage0, warm_up, dialogues, evaluation):
        assert list(cfg.run.imports) == ["sparkles.tinyworld"]
    assert evaluation.model.ckpt == f"{dialogues.run.output_dir}/checkpoint_last.pth"
    # run.sh divides each stage's batch among two processes
    assert all(cfg.run.batch_size_train % 2 == 0 for cfg in (stage0, warm_up, dialogues))


def test_paper_recipe_values():
    cfg = load_config(CONFIGS / "sparkleschat.yaml")
    run = cfg.run
    assert (run.init_lr, run.min_lr, run.warmup_lr, run.warmup_steps) == (3e-5, 1e-5, 1e-6, 400)
    assert (run.max_epoch, run.iters_per_epoch, run.batch_size_train, run.seed, run.amp) == (5, 400, 1, 42, True)
    assert (run.weight_decay, run.beta2, run.accum_grad_iters) == (0.05, 0.999, 1)
    assert cfg.model.ckpt == "models/pretrained/minigpt4_7b_stage1.pth"
    assert cfg.model.freeze_vit and cfg.model.freeze_qformer and cfg.model.freeze_llm
    assert all(d.vis_processor.train.name == "blip2_image_train" for d in cfg.datasets.values())


def test_tiny_config_and_overrides():
    cfg = load_config(CONFIGS / "sparkleschat_tiny.yaml", ["run.init_lr=5e-4", "model.freeze_vit=True"])
    assert cfg.model.model_type == "tiny" and cfg.model.freeze_vit is True and cfg.run.init_lr == 5e-4
    assert (cfg.run.sparkles_root, cfg.run.output_dir) == ("outputs/tiny", "models/sparkleschat_tiny")
    assert all(d.vis_processor.train.name == "blip2_image_eval" for d in cfg.datasets.values())
    with pytest.raises(ConfigError, match="run.bogus"):
        load_config(CONFIGS / "sparkleschat_tiny.yaml", ["run.bogus=1"])
