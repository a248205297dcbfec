"""The tiny model's towers: scene-tag labels, the read-out heads, the world's initialisation, the BLIP-2 towers
file, and which task trains on which data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparkles.common.tensors import IGNORE_INDEX as IGNORE
from sparkles.data.base import DataError
from sparkles.models import loaders
from sparkles.testing.tiny import build_tiny_model
from sparkles.tinyworld.tags import TagVocabulary

REPO = Path(__file__).resolve().parents[1]


def test_cell_labels_of_a_scene_record():
    vocab = TagVocabulary.of_world()
    record = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 2},
                          {"shape": "triangle", "colour": "blue", "size": "small", "row": 2, "col": 1}]}
    kinds, sizes = vocab.labels(record, "r")
    assert kinds[2] == vocab.kind_index("red", "circle") and kinds[7] == vocab.kind_index("blue", "triangle")
    assert [k for i, k in enumerate(kinds) if i not in (2, 7)] == [0] * 7
    assert sizes[2] == vocab.sizes.index("large") and sizes[7] == vocab.sizes.index("small")
    assert sizes.count(IGNORE) == 7
    # every colour × shape has its own class, none of them the empty class
    classes = {vocab.kind_index(c, s) for c in vocab.colours for s in vocab.shapes}
    assert len(classes) == vocab.num_kinds - 1 and 0 not in classes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tok"), seed=0).tokenizer


def _tagger(tokenizer, **overrides):
    from omegaconf import OmegaConf

    import sparkles.models  # noqa: F401  (registers the model)
    import sparkles.tinyworld  # noqa: F401  (registers the tiny preset and the towers' initialisation)
    from sparkles.common.config import build_model_config
    from sparkles.tinyworld.towers import TowerTagger

    cfg = build_model_config({"arch": "sparkleschat", "model_type": "tiny", **overrides})
    return TowerTagger(OmegaConf.to_object(cfg), TagVocabulary.of_world(), tokenizer)


def test_tagger_targets_give_each_query_its_own_count_place_and_size(tokenizer):
    vocab = TagVocabulary.of_world()
    record = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
                          {"shape": "square", "colour": "blue", "size": "small", "row": 1, "col": 1},
                          {"shape": "square", "colour": "blue", "size": "large", "row": 2, "col": 2}]}
    kinds, sizes = vocab.labels(record, "r")
    tagger = _tagger(tokenizer)
    t = tagger.targets(torch.tensor([kinds]), torch.tensor([sizes]))
    quals = list(vocab.quals)
    large, none_cell = vocab.sizes.index("large"), vocab.num_cells

    def at(head, qual):
        return int(t[head][0, quals.index(qual)])

    assert [at("count", q) for q in [("red", "circle"), ("blue", "square"), ("red", None), (None, "square"),
                                     (None, None), ("green", "circle")]] == [1, 2, 1, 2, 3, 0]
    # a single object's cell and size; "not exactly one" where there are two or none
    assert at("place", ("red", "circle")) == 0 and at("qual_size", ("red", "circle")) == large
    assert at("place", ("red", None)) == 0 and at("place", (None, "circle")) == 0
    assert at("place", ("blue", "square")) == none_cell and at("qual_size", ("blue", "square")) == IGNORE
    assert at("place", ("green", "circle")) == none_cell
    assert t["cell_kind"][0].tolist() == kinds and t["cell_size"][0].tolist() == sizes
    assert len(quals) == 15 + 5 + 3 + 1 and vocab.num_query_slots == len(quals) + 9


def test_heads_without_targets_still_get_a_zero_gradient(tokenizer):
    """Under torchrun every parameter must receive a gradient on every rank: a batch of empty scenes with
    messages that ask nothing has no size or item targets at all, and those heads must still be in the graph,
    unchanged by it."""
    from sparkles.tinyworld.towers import TowerTagger

    vocab = TagVocabulary.of_world()
    kinds, sizes = vocab.labels({"objects": []}, "empty")
    assert set(sizes) == {IGNORE}
    tagger = _tagger(tokenizer)
    logits = tagger(torch.rand(2, 3, tagger.cfg.image_size, tagger.cfg.image_size), ["Describe it.", "Hello."])
    items = {k: torch.full((2, tagger.num_items), IGNORE) for k in TowerTagger.ITEM_TARGETS}
    loss = tagger.loss(logits, torch.tensor([kinds] * 2), torch.tensor([sizes] * 2), items)
    loss.backward()
    missing = [n for n, p in tagger.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert tagger.cell_size_head.weight.grad.abs().sum() == 0 and tagger.qual_size_head.weight.grad.abs().sum() == 0
    assert tagger.item_count_head.weight.grad.abs().sum() == 0
    assert tagger.count_head.weight.grad.abs().sum() > 0 and torch.isfinite(loss)


def test_tagger_needs_item_queries_after_one_query_per_qual_and_cell(tokenizer):
    # towers that read the message need item queries after the slots, and a tokenizer to read with
    with pytest.raises(ValueError, match="item queries"):
        _tagger(tokenizer, num_query_token=8)
    with pytest.raises(ValueError, match="item queries"):
        _tagger(tokenizer, num_query_token=33)
    with pytest.raises(ValueError, match="item queries"):
        _tagger(None)
    with pytest.raises(ValueError, match="qformer_text_input"):
        _tagger(tokenizer, qformer_text_input=False)
    assert _tagger(tokenizer).num_items == 3  # 33 slots and three items


def test_tiny_towers_start_with_distinct_queries_and_xavier_cross_attention(tokenizer):
    tagger = _tagger(tokenizer)
    q = tagger.query_tokens[0]
    assert 0.8 < q.std().item() < 1.2  # the world's recipe: 1.0, not BLIP-2's 0.02
    assert 0.4 < tagger.visual_encoder.vit.pos_embed.std().item() < 0.6
    cross = tagger.Qformer.encoder.layer[0].crossattention.attention.key.weight
    bound = (6 / sum(cross.shape)) ** 0.5  # Xavier-uniform: std = bound / sqrt(3)
    assert abs(cross.std().item() - bound / 3 ** 0.5) < 0.01
    self_attn = tagger.Qformer.encoder.layer[0].attention.attention.key.weight
    assert abs(self_attn.std().item() - 0.02) < 0.005  # everything else keeps the configured normal init
    assert all(m.p == 0.0 for m in tagger.Qformer.modules() if isinstance(m, torch.nn.Dropout))
    assert 0.8 < tagger.qformer_text.word_embeddings.weight.std().item() < 1.2  # as the query tokens
    # without the recipe (towers_init ""), the modules' own initialisation: BLIP-2's 0.02 query tokens
    plain = _tagger(tokenizer, towers_init="")
    assert abs(plain.query_tokens.std().item() - 0.02) < 0.005
    assert abs(plain.visual_encoder.vit.pos_embed.std().item() - 0.02) < 0.005


def test_chat_model_and_tagger_draw_the_same_towers(tmp_path, tokenizer):
    """SparklesChat built with the tiny preset draws its towers exactly as tower pretraining does (one recipe)."""
    import sparkles.tinyworld  # noqa: F401
    from sparkles.common.config import build_model_config
    from sparkles.models.sparkleschat import build_towers

    cfg = build_model_config({"arch": "sparkleschat", "model_type": "tiny"})
    torch.manual_seed(5)
    chat_side = build_towers(cfg)
    torch.manual_seed(5)
    tagger = _tagger(tokenizer)
    for a, b in zip((chat_side[0], chat_side[2]), (tagger.visual_encoder, tagger.Qformer)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(chat_side[3], tagger.query_tokens)


@pytest.mark.parametrize("objects, message", [
    ([{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0}] * 2, "sharing a cell"),
    ([{"shape": "hexagon", "colour": "red", "size": "large", "row": 0, "col": 0}], "malformed"),
    ([{"colour": "red", "size": "large", "row": 0, "col": 0}], "malformed"),
])
def test_bad_scene_records_are_refused_with_their_place(objects, message):
    with pytest.raises(DataError, match=message) as err:
        TagVocabulary.of_world().labels({"objects": objects}, "world/scenes.json: scenes[3]")
    assert "scenes[3]" in str(err.value)


def test_towers_file_round_trips_into_the_chat_model(tmp_path):
    source = build_tiny_model(tmp_path / "a", seed=0)
    target = build_tiny_model(tmp_path / "b", seed=1)
    loaders.save_blip2(source, tmp_path / "towers.pth")
    report = loaders.load_blip2(target, tmp_path / "towers.pth")
    assert not report.ignored  # nothing written that the loader has to skip
    a, b = source.state_dict(), target.state_dict()
    image_side = [k for k in a if k.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens"))]
    assert image_side and all(torch.equal(a[k], b[k]) for k in image_side)
    assert not torch.equal(a["llama_proj.weight"], b["llama_proj.weight"])  # the projection is not a tower


def test_image_text_configs_refuse_tag_datasets_and_vice_versa():
    from sparkles.common.config import load_config
    from sparkles.tasks.image_text_pretrain import ImageTextPretrainTask
    from sparkles.tinyworld.towers import TowerPretrainTask

    cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_reasoning.yaml"), ["run.task=tower_pretrain"])
    with pytest.raises(ValueError, match="synthetic_reasoning makes samples for the task 'image_text_pretrain'"):
        TowerPretrainTask(cfg)
    cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_towers.yaml"), ["run.task=image_text_pretrain"])
    with pytest.raises(ValueError, match="run.task=tower_pretrain"):
        ImageTextPretrainTask(cfg)


def test_the_dialogue_stage_trains_on_a_fresh_world_without_the_earlier_stages(tmp_path):
    """train_configs/sparkleschat_tiny.yaml with `model.q_former_model= model.ckpt= model.allow_random_towers=true`
    (the command of its comment): random frozen towers and a fresh decoder, no files of the earlier stages."""
    import sparkles.tinyworld as tinyworld
    import train

    root = tmp_path / "world"
    assert tinyworld.main(["--out", str(root), "--seed", "3", "--preset", "ci", "--quiet"]) == 0
    summary = train.main(["--cfg-path", str(REPO / "train_configs/sparkleschat_tiny.yaml"), "--sparkles_root",
                          str(root), "--options", "model.q_former_model=", "model.ckpt=",
                          "model.allow_random_towers=true", "run.iters_per_epoch=2", "run.warmup_steps=1",
                          "run.batch_size_train=2", "run.output_dir=models/fresh"])
    assert summary["epochs"][0]["global_step"] == 2 and Path(summary["checkpoint"]).is_file()
    assert not (root / "models" / "sparkleschat_tiny_towers").exists()
