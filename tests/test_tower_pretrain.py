"""Stage 0 of the tiny model: scene-tag labels, tower pretraining through train.py, and the BLIP-2 towers file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparkles.data.base import DataError
from sparkles.data.scene_tags import IGNORE, TagVocabulary
from sparkles.data.synthetic import main as synthetic_main
from sparkles.models import loaders
from sparkles.models.tiny import build_tiny_model

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


def _tagger(tokenizer=None, model_type="tiny", **overrides):
    from omegaconf import OmegaConf

    import sparkles.models  # noqa: F401  (registers the model)
    from sparkles.common.config import build_model_config
    from sparkles.tasks.tower_pretrain import TowerTagger

    cfg = build_model_config({"arch": "sparkleschat", "model_type": model_type, **overrides})
    return TowerTagger(OmegaConf.to_object(cfg), TagVocabulary.of_world(), tokenizer)


def test_tagger_targets_give_each_query_its_own_count_place_and_size():
    vocab = TagVocabulary.of_world()
    record = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
                          {"shape": "square", "colour": "blue", "size": "small", "row": 1, "col": 1},
                          {"shape": "square", "colour": "blue", "size": "large", "row": 2, "col": 2}]}
    kinds, sizes = vocab.labels(record, "r")
    tagger = _tagger()
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


def test_heads_without_targets_still_get_a_zero_gradient():
    """Under torchrun every parameter must receive a gradient on every rank: a batch of empty scenes has no
    size targets at all, and those heads must still be in the graph, unchanged by it."""
    vocab = TagVocabulary.of_world()
    kinds, sizes = vocab.labels({"objects": []}, "empty")
    assert set(sizes) == {IGNORE}
    tagger = _tagger()
    logits = tagger(torch.rand(2, 3, tagger.cfg.image_size, tagger.cfg.image_size))
    loss = tagger.loss(logits, torch.tensor([kinds] * 2), torch.tensor([sizes] * 2))
    loss.backward()
    missing = [n for n, p in tagger.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert tagger.cell_size_head.weight.grad.abs().sum() == 0 and tagger.qual_size_head.weight.grad.abs().sum() == 0
    assert tagger.count_head.weight.grad.abs().sum() > 0 and torch.isfinite(loss)


def test_tagger_needs_one_query_per_qual_and_cell(tmp_path):
    with pytest.raises(ValueError, match="num_query_token = 33"):
        _tagger(num_query_token=8)
    # towers that read the message need item queries after the slots, and a tokenizer to read with
    tokenizer = build_tiny_model(tmp_path, seed=0).tokenizer
    with pytest.raises(ValueError, match="item queries"):
        _tagger(tokenizer, "tiny_instructed", num_query_token=33)
    with pytest.raises(ValueError, match="item queries"):
        _tagger(None, "tiny_instructed")
    assert _tagger(tokenizer, "tiny_instructed").num_items == 3  # 33 slots and three items


def test_tiny_towers_start_with_distinct_queries_and_xavier_cross_attention():
    tagger = _tagger()
    q = tagger.query_tokens[0]
    assert 0.8 < q.std().item() < 1.2  # query_token_init_std 1.0, not BERT's 0.02
    assert 0.4 < tagger.visual_encoder.vit.pos_embed.std().item() < 0.6
    cross = tagger.Qformer.encoder.layer[0].crossattention.attention.key.weight
    bound = (6 / sum(cross.shape)) ** 0.5  # Xavier-uniform: std = bound / sqrt(3)
    assert abs(cross.std().item() - bound / 3 ** 0.5) < 0.01
    self_attn = tagger.Qformer.encoder.layer[0].attention.attention.key.weight
    assert abs(self_attn.std().item() - 0.02) < 0.005  # everything else keeps the configured normal init
    assert all(m.p == 0.0 for m in tagger.Qformer.modules() if isinstance(m, torch.nn.Dropout))


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


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    assert synthetic_main(["--out", str(root), "--seed", "3", "--preset", "ci", "--quiet"]) == 0
    return root


def test_stage0_learns_the_cells_and_its_towers_load_into_sparkleschat(world):
    import train
    from sparkles.common.config import load_config
    from sparkles.data import builders
    from sparkles.models.sparkleschat import SparklesChat
    from sparkles.tasks.tower_pretrain import TOWERS_FILE, TowerPretrainTask

    options = ["run.iters_per_epoch=300", "run.warmup_steps=20", "run.batch_size_train=32", "run.log_freq=50",
               "run.output_dir=models/towers"]
    summary = train.main(["--cfg-path", str(REPO / "train_configs/sparkleschat_tiny_stage0.yaml"),
                          "--sparkles_root", str(world), "--options", *options])
    towers = Path(summary["towers"])
    assert towers == world / "models" / "towers" / TOWERS_FILE and towers.is_file()

    # The trained tagger counts the kinds in images it was trained on far better than its untrained self.
    cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_stage0.yaml"), options)
    task = TowerPretrainTask(cfg)
    tagger = task.build_model(root=world, device=torch.device("cpu"))
    state = torch.load(world / "models" / "towers" / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    tagger.load_state_dict(state["model"])
    tagger.eval()
    data = builders.build_datasets(cfg, root=world, tokenizer=None)["synthetic_scene_tags"]
    batch = data.collate([data[(i, 0)] for i in range(64)])
    acc = tagger.accuracy(batch["images"], batch["cell_kinds"], batch["cell_sizes"])
    untrained = task.build_model(root=world, device=torch.device("cpu")).eval()
    base = untrained.accuracy(batch["images"], batch["cell_kinds"], batch["cell_sizes"])
    assert acc["count"] > 0.9 and acc["image_counts_exact"] > base["image_counts_exact"] + 0.2, (acc, base)

    # The exported file puts exactly the tagger's towers into the chat model: same Q-Former outputs.
    model_cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_stage1.yaml"),
                            [f"model.q_former_model={towers}"]).model
    chat_model = SparklesChat.from_config(model_cfg, root=world)
    with torch.no_grad():
        from sparkles.models.qformer import run_qformer

        want = run_qformer(tagger.Qformer, tagger.query_tokens, tagger.ln_vision(tagger.visual_encoder(batch["images"])))
        got = chat_model.image_features(batch["images"])
    torch.testing.assert_close(got, want)


def test_image_text_configs_refuse_scene_tags_and_vice_versa():
    import sparkles.data.builders  # noqa: F401  (registers the datasets, as train.py does)
    from sparkles.common.config import load_config
    from sparkles.tasks.image_text_pretrain import ImageTextPretrainTask
    from sparkles.tasks.tower_pretrain import TowerPretrainTask

    cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_stage1.yaml"), ["run.task=tower_pretrain"])
    with pytest.raises(ValueError, match="scene-tag dataset"):
        TowerPretrainTask(cfg)
    cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_stage0.yaml"), ["run.task=image_text_pretrain"])
    with pytest.raises(ValueError, match="tower_pretrain"):
        ImageTextPretrainTask(cfg)
