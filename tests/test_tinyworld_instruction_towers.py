"""A Q-Former that reads each image's user message: rendering, model, chat engine, feature cache, towers file,
and the stage-0 data it is pretrained on (sparkles.tinyworld.instruction_tags)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sparkles.engine.batch import generate_batch
from sparkles.engine.chat import Chat
from sparkles.conversation.render import Message, Renderer
from sparkles.conversation.template import TRAIN_LAYOUT
from sparkles.models import loaders
from sparkles.testing.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
STAGE0 = str(REPO / "train_configs/sparkleschat_tiny_towers.yaml")
SLOT = "<Img><ImageHere></Img>"
FIRST = f"Compare IMAGE#1{SLOT} with IMAGE#2{SLOT}."
SECOND = f"And IMAGE#3{SLOT}: what is in it?"
PLAIN_FIRST, PLAIN_SECOND = FIRST.replace(SLOT, ""), SECOND.replace(SLOT, "")  # what the Q-Former reads


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny random SparklesChat whose Q-Former reads messages (weights drawn with std 0.3)."""
    return build_tiny_model(tmp_path_factory.mktemp("reader"), seed=0, init_std=0.3, qformer_text_input=True,
                            qformer_max_text=24).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_renderer_gives_each_image_the_message_that_shows_it(reader):
    renderer = Renderer(reader.tokenizer, reader.num_query_token)
    messages = [Message("user", FIRST), Message("assistant", "IMAGE#1 has more."), Message("user", SECOND)]
    out = renderer.render(messages, TRAIN_LAYOUT, target="A red circle.")
    assert out.image_indices == [0, 1, 2] and out.image_messages == [PLAIN_FIRST, PLAIN_FIRST, PLAIN_SECOND]
    # when the first turn is dropped to fit, its images and their messages go with it
    short = renderer.render(messages, TRAIN_LAYOUT, target="A red circle.", max_length=len(out) - 5)
    assert short.dropped_turns == 1 and short.image_indices == [2] and short.image_messages == [PLAIN_SECOND]


def test_image_tokens_depend_on_the_message_and_need_one(reader):
    pixels = _images(2)
    with torch.no_grad():
        a = reader.encode_images(pixels, [FIRST, FIRST])
        b = reader.encode_images(pixels, [FIRST, "How many red circles are there?"])
        alone = reader.encode_images(pixels[1:], ["How many red circles are there?"])
    torch.testing.assert_close(a[0], b[0])  # image 0 saw the same message in both calls
    assert (a[1] - b[1]).abs().max() > 1e-3  # image 1 did not
    torch.testing.assert_close(b[1], alone[0], rtol=1e-5, atol=1e-5)  # batching does not mix images
    with pytest.raises(ValueError, match="user message that shows"):
        reader.encode_images(pixels)


def test_markup_and_long_messages(reader):
    """The Q-Former reads the text without image markup (as the renderer hands it over), and at most
    qformer_max_text tokens of it."""
    pixels = _images(1)
    long_tail = PLAIN_FIRST + " " + "Please look very carefully at every object. " * 20
    with torch.no_grad():
        marked = reader.encode_images(pixels, [FIRST])
        plain = reader.encode_images(pixels, [PLAIN_FIRST])
        cut = reader.encode_images(pixels, [long_tail])
        cut_other = reader.encode_images(pixels, [long_tail + " More words at the very end."])
    assert (marked - plain).abs().max() > 1e-3  # markup would be read as words: the renderer removes it
    session = Chat(reader).session()
    session.add_images([pixels[0], pixels[0]])
    session.ask(FIRST)
    session.answer(max_new_tokens=1)
    torch.testing.assert_close(session.image_embeds[0], plain[0])  # the chat engine reads the message without it
    torch.testing.assert_close(cut, cut_other)  # both cut at the same 24 tokens
    assert (cut - plain).abs().max() > 1e-3  # ...which hold more than the short message


def test_chat_encodes_images_with_their_message_and_matches_batched_generation(reader):
    chat = Chat(reader)
    pixels = _images(3, seed=1)
    session = chat.session()
    session.add_images([pixels[0], pixels[1]])
    assert session.image_embeds == [None, None]  # waiting for the message that shows them
    session.ask(FIRST)
    answer = session.answer(max_new_tokens=8)
    with torch.no_grad():
        want = reader.encode_images(pixels[:2], [PLAIN_FIRST, PLAIN_FIRST])
    torch.testing.assert_close(torch.stack(session.image_embeds), want)
    # the batched path (evaluation) reads the same messages and gives the same greedy answer
    assert generate_batch(chat, [(FIRST, [pixels[0], pixels[1]])], max_new_tokens=8) == [answer]
    # a second turn's image is read with the second message; the first two keep their encodings
    session.add_image(pixels[2])
    session.ask(SECOND)
    session.answer(max_new_tokens=4)
    with torch.no_grad():
        third = reader.encode_images(pixels[2:], [PLAIN_SECOND])
    torch.testing.assert_close(session.image_embeds[2], third[0])
    torch.testing.assert_close(torch.stack(session.image_embeds[:2]), want)


def test_feature_cache_keeps_vision_tokens_and_reads_each_message(reader):
    from sparkles.tasks.image_text_pretrain import VisionFeatureCache

    cache, pixels = VisionFeatureCache(), _images(2, seed=2)
    keys = ["a", "b"]
    with torch.no_grad():
        first = cache.features(reader, pixels, keys, [FIRST, FIRST])
        again = cache.features(reader, pixels, keys, [SECOND, FIRST])
        direct = reader.image_features(pixels, [SECOND, FIRST])
    assert cache.misses == 2 and cache.hits == 2
    torch.testing.assert_close(again, direct)
    assert (again[0] - first[0]).abs().max() > 1e-3  # a cached image read with a new message is not stale


def test_towers_file_carries_the_text_side(tmp_path, reader):
    loaders.save_blip2(reader, tmp_path / "towers.pth")
    target = build_tiny_model(tmp_path / "b", seed=5, qformer_text_input=True, qformer_max_text=24)
    report = loaders.load_blip2(target, tmp_path / "towers.pth")
    assert not report.ignored
    assert "Qformer.bert.embeddings.word_embeddings.weight" in report.loaded
    assert any(".intermediate." in k for k in report.loaded)  # the text feed-forward pairs
    pixels = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(target.image_features(pixels, [FIRST, SECOND]),
                                   reader.image_features(pixels, [FIRST, SECOND]))
    # a model that does not read messages takes the same file and skips its text side, saying so
    plain = build_tiny_model(tmp_path / "c", seed=5)
    report = loaders.load_blip2(plain, tmp_path / "towers.pth")
    assert "Qformer.bert.embeddings.word_embeddings.weight" in report.ignored
    assert any(".intermediate." in k for k in report.ignored)


# --------------------------------------------------------------------------------------------- stage-0 data
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from sparkles.tinyworld import main as synthetic_main

    root = tmp_path_factory.mktemp("world")
    assert synthetic_main(["--out", str(root), "--seed", "5", "--preset", "ci", "--quiet"]) == 0
    return root


def _dataset(world, name):
    import sparkles.data.builders  # noqa: F401  (registers the datasets)
    from sparkles.common.config import load_config
    from sparkles.data import builders

    cfg = load_config(STAGE0, [])
    return builders.build_datasets(cfg, root=world, tokenizer=None)[name], cfg


def test_instruction_tags_hold_each_item_of_the_message(world):
    from sparkles.common.tensors import IGNORE_INDEX as IGNORE
    from sparkles.tinyworld.language import parse_items
    from sparkles.tinyworld.scenes import ALL_COLOURS as COLOURS, ALL_SHAPES as SHAPES, GRID, Scene
    from sparkles.tinyworld.tasks import parse_question, parse_statement
    from sparkles.tinyworld.writers import load_scenes

    data, cfg = _dataset(world, "synthetic_instruction_tags")
    items = cfg.model.num_query_token - 33
    scenes = load_scenes(world)
    batch = data.collate([data[(i, 0)] for i in range(0, len(data), max(1, len(data) // 64))])
    assert batch["item_count"].shape == (batch["num_samples"], items) == batch["item_place"].shape
    seen = set()
    for row, (message, key) in enumerate(zip(batch["messages"], batch["ids"])):
        scene = Scene.from_record(scenes[key.rsplit("/", 1)[1]])
        task = parse_question(message)
        if task.kind == "bison":
            things = [(it.colour, it.shape) for it in parse_items(task.text)]
        elif task.kind in ("where", "size"):  # one named object: its kind's count and place
            things = [task.obj]
        else:  # one counted kind: the statement's or the question's
            qual = parse_statement(task.text).qual if task.kind == "nlvr2" else task.qual
            things = [(qual.colour, qual.shape)]
        seen.add(task.kind)
        for i in range(items):
            count, place = int(batch["item_count"][row, i]), int(batch["item_place"][row, i])
            colour, shape = int(batch["item_colour"][row, i]), int(batch["item_shape"][row, i])
            if i >= len(things):
                assert count == place == colour == shape == IGNORE
                continue
            # what the message names (the last class: any colour / any shape)
            assert colour == (COLOURS.index(things[i][0]) if things[i][0] else len(COLOURS))
            assert shape == (SHAPES.index(things[i][1]) if things[i][1] else len(SHAPES))
            objs = [o for o in scene.objects if things[i][0] in (None, o.colour) and things[i][1] in (None, o.shape)]
            assert count == min(len(objs), 4)
            assert place == (objs[0].row * GRID + objs[0].col if len(objs) == 1 else GRID * GRID)
    assert {"bison", "nlvr2", "where"} <= seen


def test_caption_variants_and_statements_are_mixed_in_by_the_sample_seed(world):
    from sparkles.tinyworld.scenes import Scene
    from sparkles.tinyworld.tasks import parse_question, parse_statement
    from sparkles.tinyworld.writers import load_scenes

    data, cfg = _dataset(world, "synthetic_instruction_tags")
    shares = cfg.datasets.synthetic_instruction_tags
    assert 0 < shares.caption_variants and 0 < shares.nlvr2_statements
    a, b = data[(3, 11)], data[(3, 11)]
    assert a[4] == b[4] and torch.equal(a[1], b[1])  # a sample is a function of its seed
    scenes = load_scenes(world)
    fixed = data.samples[3]
    drawn = [data.sample(3, seed) for seed in range(600)]
    others = [d for d in drawn if d != fixed]
    variants = [d for d in others if parse_question(d.message).kind == "bison"]
    statements = [d for d in others if parse_question(d.message).kind == "nlvr2"]
    assert len(variants) + len(statements) == len(others)
    assert abs(len(variants) / len(drawn) - shares.caption_variants) < 0.06
    assert abs(len(statements) / len(drawn) - shares.nlvr2_statements) < 0.06
    assert all(d.fit in (0, 1) and d.items for d in variants)  # BISON questions with every item's targets
    assert len({d.image for d in variants}) > 50 and len({d.message for d in variants}) > 50
    # a statement read with any image counts that image's objects of the statement's kind
    assert len({d.image for d in statements}) > 50
    for d in statements:
        qual = parse_statement(parse_question(d.message).text).qual
        assert d.asked == qual.count(Scene.from_record(scenes[d.image])) == d.items[0][0]


def test_a_replaced_question_is_read_again_with_its_images(reader):
    """The demo drops a question whose answer was interrupted; the images are then read with the new one."""
    chat, pixels = Chat(reader), _images(2, seed=3)
    other = FIRST[:-1] + " by their circles."  # the same text up to and past both images
    session = chat.session()
    session.add_images([pixels[0], pixels[1]])
    session.ask(FIRST)
    next(session.stream(max_new_tokens=4))  # encoded with FIRST, then interrupted
    session.messages.pop()
    session.ask(other)
    answer = session.answer(max_new_tokens=6)
    with torch.no_grad():
        want = reader.encode_images(pixels, [other.replace(SLOT, "")] * 2)
    torch.testing.assert_close(torch.stack(session.image_embeds), want)
    fresh = chat.session()
    fresh.add_images([pixels[0], pixels[1]])
    fresh.ask(other)
    assert fresh.answer(max_new_tokens=6) == answer  # nothing of the first reading is reused from the cache


def test_instructed_stage0_learns_the_items_and_its_towers_load_into_sparkleschat(world):
    import train
    from sparkles.common.config import load_config
    from sparkles.common.tensors import IGNORE_INDEX as NO_ITEM
    from sparkles.models.qformer import run_qformer, tokenize_instructions
    from sparkles.models.sparkleschat import SparklesChat
    from sparkles.tinyworld.towers import TowerPretrainTask

    options = ["run.iters_per_epoch=250", "run.warmup_steps=20", "run.log_freq=50", "run.output_dir=models/towers"]
    summary = train.main(["--cfg-path", STAGE0, "--sparkles_root", str(world), "--options", *options])
    towers = Path(summary["towers"])
    assert towers.is_file()

    # The tagger reads the scene tags and the messages' items of training pairs far better than its untrained self
    cfg = load_config(STAGE0, options)
    task = TowerPretrainTask(cfg)
    tagger = task.build_model(root=world, device=torch.device("cpu"))
    state = torch.load(world / "models" / "towers" / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    tagger.load_state_dict(state["model"])
    tagger.eval()
    data, _ = _dataset(world, "synthetic_instruction_tags")
    batch = data.collate([data[(i, 0)] for i in range(0, len(data), len(data) // 96)])
    untrained = task.build_model(root=world, device=torch.device("cpu")).eval()

    def figures(model):
        acc = model.accuracy(batch["images"], batch["cell_kinds"], batch["cell_sizes"], batch["messages"])
        with torch.no_grad():
            got = model(batch["images"], batch["messages"])["item_count"].argmax(-1)
        known = batch["item_count"] != NO_ITEM
        return acc["count"], (got == batch["item_count"])[known].float().mean().item()

    (count, items), (count0, items0) = figures(tagger), figures(untrained)
    assert count > 0.85 and count > count0 + 0.2 and items > items0 + 0.15, (count, items, count0, items0)

    # The exported file puts exactly the tagger's towers, text side included, into the chat model.
    model_cfg = load_config(str(REPO / "train_configs/sparkleschat_tiny_reasoning.yaml"),
                            [f"model.q_former_model={towers}"]).model
    chat_model = SparklesChat.from_config(model_cfg, root=world)
    with torch.no_grad():
        ids, mask = tokenize_instructions(tagger.tokenizer, batch["messages"], tagger.cfg.qformer_max_text)
        want = run_qformer(tagger.Qformer, tagger.query_tokens,
                           tagger.ln_vision(tagger.visual_encoder(batch["images"])), tagger.qformer_text(ids), mask)
        got = chat_model.image_features(batch["images"], batch["messages"])
    torch.testing.assert_close(got, want)

    # towers_report reads that checkpoint's item heads on every held-out BISON and NLVR2 image
    from sparkles.tinyworld import towers_report

    checkpoint = world / "models" / "towers" / "checkpoint_last.pth"
    report = towers_report.towers_report(towers_report.load_tagger(Path(STAGE0), checkpoint, world), world)
    before = towers_report.towers_report(untrained, world)
    bison = json.loads((world / "evaluation/BISON/annotations/sparkles_evaluation_bison_annotations.json").read_text())
    nlvr2 = json.loads((world / "evaluation/NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json").read_text())
    assert report["bison_pairs_with_one_fitting_image"]["pairs"] == len(bison)
    assert report["nlvr2_asked_count_right"]["images"] == 2 * len(nlvr2)
    assert sum(row["items"] for row in report["bison_items"].values()) == 2 * sum(
        len(re.split(", | and ", item["caption"])) for item in bison)
    assert report["nlvr2_asked_count_right"]["share"] > before["nlvr2_asked_count_right"]["share"] + 0.1
    assert towers_report.main(["--root", str(world), "--checkpoint", "models/towers/checkpoint_last.pth",
                               "--config", STAGE0, "--out", str(world / "towers.json")]) == 0
    assert json.loads((world / "towers.json").read_text()) == report
    assert towers_report.main(["--root", str(world), "--checkpoint", "models/none.pth", "--config", STAGE0]) == 2
    with pytest.raises(ValueError, match="not a stage-0 checkpoint"):
        towers_report.load_tagger(Path(STAGE0), towers, world)  # the exported file has no read-out heads


def test_position_jitter_moves_the_text_in_training_only():
    from sparkles.models.qformer import QFormerTextEmbeddings

    torch.manual_seed(0)
    emb = QFormerTextEmbeddings(50, 8, 10, init_std=1.0, position_jitter=6)
    ids = torch.randint(0, 50, (64, 5))
    assert emb.position_embeddings.num_embeddings == 16 and emb.max_length == 10
    words = emb.word_embeddings(ids)
    train = emb(ids) - words  # the position part each text got
    table = emb.position_embeddings.weight

    def start_of(row):
        return next(k for k in range(7) if torch.allclose(row[0], table[k], atol=1e-5))

    assert {start_of(row) for row in train} == set(range(7))  # every start 0..6 is drawn
    for row in train:  # and each text's positions run on from its start
        torch.testing.assert_close(row, table[start_of(row):start_of(row) + 5])
    emb.eval()
    torch.testing.assert_close(emb(ids) - words, emb.position_embeddings.weight[:5].expand(64, -1, -1))
    with pytest.raises(ValueError, match="at most 10"):
        emb(torch.zeros(1, 11, dtype=torch.long))
